"""Faults and bad input in training (issue #27): a full disk, Ctrl-C, options that were silently ignored,
masked-LM with nothing to score, labels no training row teaches, and misleading messages. Each case ends with one
message saying what happened and how to go on, and leaves the previous checkpoint whole."""
import json
import os
import re

import pytest

import train
from model import MaskedLM
from test_mlm import mlm_job, tiny_mlm_checkpoint
from test_robustness import tiny_checkpoint, write_texts


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Unlabelled notes (one per line) for --task mlm, and a labelled test file."""
    root = tmp_path_factory.mktemp("faults")
    rows = open(write_texts(root / "labelled.csv", 30, 0)).read().splitlines()[1:]
    (root / "notes.txt").write_text("\n".join(row.rsplit(",", 1)[0] for row in rows) + "\n")
    return {"train": str(root / "notes.txt"), "test": write_texts(root / "test.csv", 8, 1), "root": root,
            "labelled": str(root / "labelled.csv"), "classifier": tiny_checkpoint(root / "classifier")}


FAST = ["--max-length", "32", "--batch-size", "4", "--log-every", "1", "--lr", "2e-3"]


# ----------------------------------------------------------------------------- 3: a smaller masked LM

def test_mlm_keeps_the_layers_num_layers_asks_for(tmp_path, texts):
    """The tiny BERT has 2 layers: --num-layers 1 trains and saves a masked LM of 1 (it was silently all)."""
    model = tiny_mlm_checkpoint(tmp_path / "model", "bert")
    out = tmp_path / "mlm"
    train.main(mlm_job(model, texts, out, "--num-layers", "1", "--max-steps", "2", "--eval-every", "2"))
    assert json.load(open(out / "train_config.json"))["num_layers"] == 1
    assert json.load(open(out / "config.json"))["num_hidden_layers"] == 1
    assert len(MaskedLM.from_pretrained(out, verbose=False).encoder.layers) == 1
    with pytest.raises(SystemExit, match=r"--num-layers 3: the checkpoint has only 2 layers"):
        train.main(mlm_job(model, texts, tmp_path / "too_many", "--num-layers", "3"))


# ----------------------------------------------------------------------------- 5: a config file naming another

def test_config_key_inside_a_config_file_is_an_error(tmp_path):
    inner = write(tmp_path / "inner.toml", "lr = 1e-3\n")
    outer = write(tmp_path / "outer.toml", f'config = "{inner}"\nepochs = 2\n')
    with pytest.raises(SystemExit, match=r"--config .*outer.toml: config = '.*inner.toml': a config file cannot "
                                         r"name another; merge its options into this one"):
        train.parse_config(["--config", outer])


# ----------------------------------------------------------------------------- 4: masked-LM with nothing to score

@pytest.mark.parametrize("case", ["rate", "val", "test"])
def test_mlm_refuses_evaluation_data_without_a_masked_token(tmp_path, texts, case, monkeypatch):
    """It reported validation loss 0.0000, perplexity 1.00, and picked a "best" checkpoint from that. Two texts of
    one word each: at 0.15, seed 0 masks neither."""
    monkeypatch.setattr(MaskedLM, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    model = tiny_mlm_checkpoint(tmp_path / "model", "bert")
    two_words = write(tmp_path / "two.txt", "w1\nw2\n")
    extra = {"rate": ["--mlm-probability", "0.001"], "val": ["--val-file", two_words],
             "test": ["--test-file", two_words]}[case]
    split, tokens = ("validation", r"\d+") if case == "rate" else ("test" if case == "test" else "validation", "6")
    with pytest.raises(SystemExit, match=rf"--mlm-probability [\d.]+ masks none of the {tokens} tokens of the \d+ "
                                         rf"{split} sequence\(s\): there is nothing to score\. Raise --mlm-prob"):
        train.main(mlm_job(model, texts, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 6: labels only in validation

def test_multi_label_split_warns_of_labels_no_training_row_has(tmp_path, texts, capsys):
    """30 labels of one row each: the 20% validation share holds 6 of them, which no training row has."""
    rows = open(texts["labelled"]).read().splitlines()[1:]
    data = write(tmp_path / "rare.csv", "text,labels\n" + "".join(f"{row.rsplit(',', 1)[0]},l{i};common\n"
                                                                 for i, row in enumerate(rows)))
    out = tmp_path / "out"
    train.main(["--model", texts["classifier"], "--train-file", data, "--test-file", "", "--task", "multi",
                "--val-fraction", "0.2", "--out-dir", str(out), "--max-steps", "1", *FAST])
    printed = capsys.readouterr().out
    assert re.search(r"warning: .*rare.csv: 6 of 31 labels occur only in the --val-fraction 0.2 validation share, "
                     r"in no training row: the model cannot learn them.*\('l\d+' \(1 row\), ", printed), printed
    assert (out / "model.safetensors").exists()  # a warning: the run goes on
