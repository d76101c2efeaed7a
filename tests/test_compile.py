"""predict.py --compile: the forward compiled for inference gives the eager model's logits, and batches of new sizes
and lengths reuse its graphs instead of compiling again."""
import numpy as np
import pytest
import torch

from predict import Predictor
import train
from data import read_table
from test_robustness import tiny_checkpoint, write_texts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    model = tiny_checkpoint(root / "model")
    out = root / "out"
    train.main(["--model", model, "--train-file", write_texts(root / "train.csv", 24, 0), "--val-file",
                write_texts(root / "val.csv", 6, 1), "--test-file", "", "--out-dir", str(out), "--max-length", "32",
                "--batch-size", "4", "--max-steps", "2", "--device", "cpu"])
    return out, write_texts(root / "texts.csv", 40, 3)


def test_compiled_inference_matches_eager_and_does_not_recompile(trained):
    torch._dynamo.reset()
    out, path = trained
    texts = read_table(path, label_column=[]).texts
    eager = Predictor(str(out), device="cpu", batch_size=4)
    fast = Predictor(str(out), device="cpu", batch_size=4, compile=True)
    assert fast.scorer is not fast.model
    by_length = sorted(texts, key=len)
    mixed = [by_length[-1], *by_length[:3]]  # one batch, mostly padding: packed (make_batch on a CPU)
    first = fast.logits(texts)  # compiles a graph for each layout that comes: padded batches, then packed,
    fast.logits(mixed)
    fast.logits(texts[:1])  # and a batch of one text (torch specializes sizes 0 and 1)
    compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for some in (texts[:2], texts[:3], texts[5:11], texts[:7], texts[:16], by_length[-3:] + by_length[:2], mixed):
        got, want = fast.logits(some), eager.logits(some)  # batches of other sizes and lengths, both layouts
        assert np.abs(got - want).max() <= 1e-5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiles  # no new graph
    assert np.abs(first - eager.logits(texts)).max() <= 1e-5
