"""Read and modify (issue 38): each pooling and multi-label loss named in one table that the option checks, -h,
the config mapping and the model read; -h shows every option's explanation and choices from its field."""
import ast
import contextlib
import dataclasses
import glob
import importlib
import io
import os
import re

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


# ----------------------------------------------------------------------------- names in docstrings and docs exist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPINE = ("model.py", "data.py", "metrics.py", "train.py", "predict.py")
MODULES = r"(?:model|data|metrics|train|predict|bench|side\.[a-z_]+)"
# `module.Name` (a class or a constant: capitalised), or any `module.name` in backticks; then .attribute chains
NAME = r"[A-Z][a-z]\w*|[A-Z][A-Z0-9_]+\b|(?<=`)[a-z_][a-z0-9_]*"  # a class, a CONSTANT, a `name` in backticks
DOTTED = re.compile(rf"(`?)\b({MODULES})\.({NAME})((?:\.[A-Za-z_]\w*)*)")
FILE_NAME = re.compile(r"\b((?:side/|scripts/)?[a-z_]+\.py)'s `?([A-Z][a-z]\w*|[a-z_]\w*(?=`))")  # not CPU, FLOPs
HYPOTHETICAL = {"side/tokens.py"}  # docs/objectives.md: the file a third objective would add
FILE = re.compile(r"\b((?:side|scripts|tests)/[a-z_]+\.py)\b")


def prose():
    """(where, text) of every spine docstring (module, class, function) and docs/ page."""
    for name in SPINE:
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
                yield f"{name}:{getattr(node, 'name', 'module')}", ast.get_docstring(node)
    for page in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        yield os.path.relpath(page, ROOT), open(page).read()


def defined_names(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    return names | {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}


def broken_references(where, text):
    broken = []
    for _, module, first, rest in DOTTED.findall(text):
        target = importlib.import_module(module)
        for attribute in (first + rest).split("."):
            if not hasattr(target, attribute):
                broken.append(f"{where}: {module}.{first}{rest}")
                break
            target = getattr(target, attribute)
    for path in FILE.findall(text):
        if not os.path.isfile(os.path.join(ROOT, path)) and path not in HYPOTHETICAL:
            broken.append(f"{where}: {path}")
    for path, name in FILE_NAME.findall(text):
        if os.path.isfile(os.path.join(ROOT, path)) and name not in defined_names(path):
            broken.append(f"{where}: {path}'s {name}")
    return broken


def test_every_name_a_spine_docstring_or_docs_page_gives_exists():
    broken = [b for where, text in prose() for b in broken_references(where, text)]
    assert not broken, "\n".join(broken)


def test_the_name_check_finds_a_broken_name():
    assert broken_references("x", "see model.EncoderClassifier.aggregate and side/mlm.py's Nothing") == [
        "x: model.EncoderClassifier.aggregate", "x: side/mlm.py's Nothing"]
    assert broken_references("x", "`model.pool_tokens`, data.TextEncoder, side/mlm.py's MaskedLanguageModelling") == []
