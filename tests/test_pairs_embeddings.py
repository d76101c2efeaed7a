"""Sentence pairs through train.py and predict.py. Pair encoding itself is checked against AutoTokenizer in
test_data.py."""
import csv
import random

import numpy as np
import torch

import predict
import train
from test_robustness import WORDS, tiny_checkpoint

FAST = ["--max-length", "32", "--batch-size", "4", "--max-steps", "2", "--eval-every", "2", "--log-every", "1"]


def write_pairs(path, n, seed):
    """Rows whose label says whether the pair's second text repeats a word of the first: a task only pairs can do."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["premise", "hypothesis", "label"])
        for i in range(n):
            first = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
            second = [rng.choice(first) if i % 2 else rng.choice(WORDS)] + [rng.choice(WORDS) for _ in range(2)]
            writer.writerow([" ".join(first), " ".join(second), "entails" if i % 2 else "neutral"])
    return str(path)


def test_pairs_train_predict_and_reach_the_model_as_segment_b(tmp_path, capsys):
    model, out = tiny_checkpoint(tmp_path / "model"), tmp_path / "out"
    data = write_pairs(tmp_path / "pairs.csv", 24, 0)
    train.main(["--model", model, "--train-file", data, "--val-file", write_pairs(tmp_path / "val.csv", 6, 1),
                "--test-file", "", "--text-column", "premise", "--text-pair-column", "hypothesis", "--out-dir",
                str(out), *FAST])
    metrics = predict.main(["--model", str(out), "--input", data, "--text-column", "premise",
                            "--text-pair-column", "hypothesis", "--label-column", "label"])
    assert 0 <= metrics["accuracy"] <= 1
    predict.main(["--model", str(out), "--input", data, "--text-column", "premise", "--text-pair-column",
                  "hypothesis", "--output", str(tmp_path / "predictions.csv")])
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert list(rows[0]) == ["text", "text_pair", "label", "probability"] and rows[0]["text_pair"]

    predictor = predict.Predictor(str(out), device="cpu")
    ids = torch.tensor([[2, 6, 7, 3, 8, 3]])  # [CLS] w1 w2 [SEP] w3 [SEP] in the test vocab
    assert predictor.encoder.encode(["w1 w2"], ["w3"]) == [ids[0].tolist()]
    types = torch.tensor([[0, 0, 0, 0, 1, 1]])
    with torch.no_grad():
        as_pair = predictor.model(ids, token_type_ids=types)[0]
        as_one_text = predictor.model(ids)[0]
    logits = predictor.logits(["w1 w2"], ["w3"])
    assert np.abs(logits - as_pair.numpy()).max() <= 1e-7
    assert np.abs(logits - as_one_text.numpy()).max() > 1e-6  # the second segment's token type moves them
