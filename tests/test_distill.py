"""Smaller, faster models (issue #19): students with fewer layers (--num-layers), distillation from a teacher
(--teacher) and int8 inference (predict.py --int8). Tiny random checkpoints and tiny made-up data keep it fast."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import predict
import train
from make_golden import padded_batch, save_reference, tiny_reference_model
from model import EncoderClassifier, global_every, student_layers
from test_robustness import tiny_checkpoint, write_texts


def reference():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


# ----------------------------------------------------------------------------- fewer layers


def test_which_layers_a_student_keeps():
    assert student_layers(6, 3) == [0, 2, 4]  # every other layer, as DistilBERT
    assert student_layers(12, 6) == [0, 2, 4, 6, 8, 10]
    assert student_layers(22, 11) == list(range(0, 22, 2))
    assert student_layers(6, 4) == [0, 1, 2, 3]  # more than half: the first K
    assert student_layers(6, 2) == [0, 3]
    assert student_layers(6, 1) == [0]
    assert student_layers(6, 6) == list(range(6))
    # ModernBERT-base (22 layers, global every 3) halved: still global every 3
    base = ["full_attention" if i % 3 == 0 else "sliding_attention" for i in range(22)]
    assert global_every([base[i] for i in student_layers(22, 11)]) == 3
    assert global_every([base[i] for i in student_layers(22, 7)]) == 1  # a step of 3 keeps only global layers
    assert global_every(["full_attention", "sliding_attention", "full_attention", "full_attention"]) is None


# arch, teacher layers, global every (ModernBERT), student layers, the student's layer types (g = global)
STUDENTS = [("bert", 6, None, 3, None), ("bert", 4, None, 1, None),
            ("modernbert", 6, 3, 3, "gll"), ("modernbert", 6, 2, 2, "gl"), ("modernbert", 6, 2, 3, "ggg")]


@pytest.mark.parametrize("arch,layers,every,keep,types", STUDENTS)
def test_student_folder_loads_in_transformers_with_our_logits(tmp_path, arch, layers, every, keep, types):
    """The kept layers' weights, renumbered, with num_hidden_layers and ModernBERT's pattern in config.json (both
    layouts: layer_types, and global_attn_every_n_layers for older readers): transformers gives our logits."""
    T = reference()
    kwargs = {"global_every": every} if every else {}
    teacher = tiny_reference_model(arch, 5, pooling="mean", layers=layers, hidden=36, heads=3, **kwargs)
    save_reference(teacher, tmp_path / "teacher")
    student = EncoderClassifier.from_pretrained(tmp_path / "teacher", num_layers=keep, verbose=False).eval()
    assert len(student.encoder.layers) == keep
    kept = student_layers(layers, keep)
    ours_by_name, theirs = student.hf_state_dict(), teacher.state_dict()
    prefix = "bert.encoder.layer." if arch == "bert" else "model.layers."
    for new, old in enumerate(kept):  # every tensor of each kept layer, renumbered
        mine = {k[len(f"{prefix}{new}."):]: v for k, v in ours_by_name.items() if k.startswith(f"{prefix}{new}.")}
        assert mine and all(torch.equal(v, theirs[f"{prefix}{old}.{k}"]) for k, v in mine.items())
    student.save_pretrained(tmp_path / "student")

    config = json.load(open(tmp_path / "student" / "config.json"))
    assert config["num_hidden_layers"] == keep
    if arch == "modernbert":
        assert [t[0] for t in config["layer_types"]] == [{"g": "f", "l": "s"}[c] for c in types]
        assert config["global_attn_every_n_layers"] == global_every(config["layer_types"])
    ref, info = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "student", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids, mask = padded_batch(3)  # rows longer than ModernBERT's window of 8
    with torch.no_grad():
        expected = ref.eval()(input_ids=ids, attention_mask=mask).logits
        logits, _ = student(ids, mask)
    assert (logits - expected).abs().max() <= 1e-5
    if arch == "modernbert":  # an older transformers reads only global_attn_every_n_layers: the same model
        del config["layer_types"]
        json.dump(config, open(tmp_path / "student" / "config.json", "w"))
        old_layout = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").eval()
        with torch.no_grad():
            assert (old_layout(input_ids=ids, attention_mask=mask).logits - expected).abs().max() <= 1e-5
