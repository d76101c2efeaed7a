"""Read and modify (issue 38): each pooling and multi-label loss named in one table that the option checks, -h,
the config mapping and the model read; -h shows every option's explanation and choices from its field."""
import contextlib
import dataclasses
import importlib
import io

import pytest
import torch

import model
import side.config
from side import options
from side.hf import config_from_hf, config_to_hf
from test_heads import tiny


def help_text(config_class):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        options.parse_config(config_class, ["-h"])
    return "".join(out.getvalue().split())  # argparse wraps lines where it likes (after a hyphen too)


def test_help_lists_the_tables_choices_and_every_fields_explanation():
    text = help_text(side.config.TrainConfig)
    assert "--pooling{auto," + ",".join(model.POOLINGS) + "}" in text
    assert "--loss{" + ",".join(model.MULTI_LABEL_LOSSES) + "}" in text
    assert "--threshold{global,per_label,NUMBER}" in text
    for f in dataclasses.fields(side.config.TrainConfig):
        assert f.metadata["help"], f.name  # every option explains itself
        assert "".join(f.metadata["help"].split()) in text, f.name
    for section in ("modelanddata:", "optimisation:", "theheadandmulti-label:", "system:"):
        assert section in text


def focal(logits, targets):
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets) * 2


def second_token(hidden, mask, label_attention=None):
    return hidden[:, 1]


@pytest.fixture
def new_entries(monkeypatch):
    """A loss and a pooling added as one function and one table entry each, nothing else."""
    monkeypatch.setitem(model.MULTI_LABEL_LOSSES, "focal", focal)
    monkeypatch.setitem(model.POOLINGS, "second", second_token)
    yield importlib.reload(side.config).TrainConfig
    monkeypatch.undo()
    importlib.reload(side.config)


def test_a_new_loss_and_pooling_are_one_entry_each(new_entries):
    TrainConfig = new_entries
    text = help_text(TrainConfig)
    assert "focal" in text and "second" in text
    cfg = options.parse_config(TrainConfig, ["--loss", "focal", "--pooling", "second"])
    options.check_options(cfg)  # accepted: the checks read the tables
    with pytest.raises(SystemExit, match=r"--loss 'nope' must be bce, asl or focal"):
        options.check_options(dataclasses.replace(cfg, loss="nope"))
    net = tiny("bert", "second")
    net.config.multi_label_loss = "focal"
    saved = config_to_hf(net.config)  # the config mapping keeps both names
    assert (saved["classifier_pooling"], saved["multi_label_loss"]) == ("second", "focal")
    again = config_from_hf(saved)
    assert (again.classifier_pooling, again.multi_label_loss) == ("second", "focal")
    ids = torch.randint(5, 99, (2, 7))
    labels = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    logits, loss = net(ids, labels=labels)
    hidden = net.encode(ids)
    assert torch.allclose(logits, net.head(hidden[:, 1]), atol=1e-6)  # the model pools with the new entry
    assert torch.allclose(loss, focal(logits, labels))  # and scores with the new loss


def test_model_refuses_a_name_not_in_its_tables():
    with pytest.raises(ValueError, match="classifier_pooling 'second' is not supported"):
        tiny("bert", "second")
    net = tiny("bert", "cls")
    net.config.multi_label_loss = "focal"
    with pytest.raises(ValueError, match="multi_label_loss 'focal' is not supported"):
        model.head_options(net.config)
