"""Faults and bad input in training (issue #27): a full disk, Ctrl-C, options that were silently ignored,
masked-LM with nothing to score, labels no training row teaches, and misleading messages. Each case ends with one
message saying what happened and how to go on, and leaves the previous checkpoint whole."""
import os

import pytest

import train


def write(path, text):
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- 5: a config file naming another

def test_config_key_inside_a_config_file_is_an_error(tmp_path):
    inner = write(tmp_path / "inner.toml", "lr = 1e-3\n")
    outer = write(tmp_path / "outer.toml", f'config = "{inner}"\nepochs = 2\n')
    with pytest.raises(SystemExit, match=r"--config .*outer.toml: config = '.*inner.toml': a config file cannot "
                                         r"name another; merge its options into this one"):
        train.parse_config(["--config", outer])
