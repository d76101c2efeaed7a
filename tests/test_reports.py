"""The report's calibration and rare-label parts: temperature scaling on synthetic over-confident logits, and
tiny jobs (the golden tiny BERT) that write ECE/Brier, F1 by label frequency and a temperature predict.py applies."""
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

import metrics
import train
from predict import Predictor
from side import calibrate
from test_robustness import tiny_checkpoint, write_texts


def overconfident(seed, n, n_labels, multi_label, scale=3.0):
    """Labels drawn from the probabilities of true logits; the model's logits are the true ones times scale."""
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(n, n_labels)) * 1.5
    if multi_label:
        true -= 1.0  # mostly absent labels, as in clinical coding
        targets = (rng.random((n, n_labels)) < metrics.sigmoid(true)).astype(np.float32)
    else:
        probs = metrics.softmax(true)
        targets = np.array([rng.choice(n_labels, p=p) for p in probs])
    return true * scale, targets


def nll(logits, targets, multi_label):
    if multi_label:
        p = metrics.sigmoid(logits)
        return float(-np.mean(targets * np.log(p) + (1 - targets) * np.log(1 - p)))
    return float(-np.mean(np.log(metrics.softmax(logits)[np.arange(len(targets)), targets])))


@pytest.mark.parametrize("multi_label", [False, True])
def test_temperature_lowers_nll_and_ece_on_held_out_overconfident_logits(multi_label):
    logits, targets = overconfident(0, 24000, 6, multi_label)
    fit_on, held_out = slice(0, 20000), slice(20000, None)
    temperature = calibrate.fit_temperature(logits[fit_on], targets[fit_on], multi_label)
    assert np.all(np.abs(np.asarray(temperature) - 3.0) < 0.3), temperature  # the scale put in comes back
    scaled = logits[held_out] / np.asarray(temperature)
    raw_cal = metrics.calibration_metrics(logits[held_out], targets[held_out], multi_label)
    cal = metrics.calibration_metrics(scaled, targets[held_out], multi_label)
    assert nll(scaled, targets[held_out], multi_label) < nll(logits[held_out], targets[held_out], multi_label) - 0.05
    assert cal["ece"] < raw_cal["ece"] / 2 and cal["brier"] < raw_cal["brier"]


def test_the_fit_is_the_minimum_and_rare_labels_share_one():
    logits, targets = overconfident(1, 600, 4, multi_label=True)
    targets[:, 3] = 0
    targets[:9, 3] = 1  # 9 positives: under MIN_POSITIVES, so label 3 takes the shared temperature
    temperature = calibrate.fit_temperature(logits, targets, multi_label=True)
    shared = calibrate.fit_temperature(logits.reshape(-1, 1), targets.reshape(-1, 1), True, min_positives=10 ** 9)
    assert temperature[3] == shared[0] and len(set(temperature)) == 4
    for label, t in enumerate(temperature[:3]):  # each label's own: no temperature nearby does better
        column = lambda t: nll(logits[:, label] / t, targets[:, label], True)
        assert all(column(t) <= column(t * f) for f in (0.99, 1.01, 0.9, 1.1))
    separated = logits.copy()
    separated[:, 0] = np.where(targets[:, 0] > 0, 5.0, -5.0)  # label 0 separated perfectly: no finite optimum
    fit = calibrate.fit_temperature(separated, targets, multi_label=True)
    assert fit[0] == fit[3] > calibrate.BOUNDS[0] and fit[1] == temperature[1]  # the shared one, as rare label 3
    single, classes = overconfident(2, 500, 5, multi_label=False)
    t = calibrate.fit_temperature(single, classes, multi_label=False)
    assert all(nll(single / t, classes, False) <= nll(single / (t * f), classes, False) for f in (0.99, 1.01))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    multi = ("c0;c1", "c1", "c2", "c1;c2")
    return {"model": tiny_checkpoint(root / "model"), "root": root,
            "single": [write_texts(root / f"single_{name}.csv", n, seed) for name, n, seed in
                       (("train", 40, 0), ("val", 24, 1), ("test", 12, 2))],
            "multi": [write_texts(root / f"multi_{name}.csv", n, seed, multi) for name, n, seed in
                      (("train", 60, 0), ("val", 24, 1), ("test", 16, 2))]}


def tiny_job(tiny, task, out, *extra):
    train_file, val_file, test_file = tiny[task]
    return train.main(["--model", tiny["model"], "--train-file", train_file, "--val-file", val_file, "--test-file",
                       test_file, "--out-dir", str(out), "--max-length", "32", "--batch-size", "8", "--epochs", "2",
                       "--lr", "2e-3", *extra])


def test_calibrated_job_writes_the_temperature_and_predict_applies_it(tiny, tmp_path):
    out = tmp_path / "out"
    # 5e-3: a model confident enough to have a temperature to fit (at 2e-3 the fit runs to the search's edge)
    result = tiny_job(tiny, "single", out, "--calibrate", "temperature", "--lr", "5e-3")
    config = json.load(open(out / "config.json"))
    temperature = config["calibration_temperature"]
    assert isinstance(temperature, float) and abs(temperature - 1) > 1e-3
    assert "calibration: temperature" in (out / "report.txt").read_text()
    saved = json.load(open(out / "test_metrics.json"))
    assert {"ece", "brier", "ece_uncalibrated", "brier_uncalibrated"} <= set(saved) <= set(result["test"]) | {
        "validation"}
    assert saved["validation"]["ece"] == result["validation"]["ece"]
    raw_folder = tmp_path / "raw"  # the same folder without the temperature: the raw logits
    shutil.copytree(out, raw_folder)
    del config["calibration_temperature"]
    json.dump(config, open(raw_folder / "config.json", "w"))
    texts = ["w1 w2 w3 w4", "w30 w31 w22", "w50 w45 w59 w41 w40"]
    raw = Predictor(str(raw_folder), device="cpu").logits(texts)
    calibrated = Predictor(str(out), device="cpu")
    assert np.array_equal(calibrated.logits(texts), raw / np.float32(temperature))
    probabilities = [list(p["probabilities"].values()) for p in calibrated.predict(texts)]
    assert np.array_equal(np.asarray(probabilities), metrics.softmax(raw / np.float32(temperature)))
    assert np.abs(np.asarray(probabilities) - metrics.softmax(raw)).max() > 1e-3
    T = pytest.importorskip("transformers")  # transformers reads the folder, and gives the raw logits
    T.logging.set_verbosity_error()
    import torch
    reference = T.AutoModelForSequenceClassification.from_pretrained(out).eval()
    inputs = T.AutoTokenizer.from_pretrained(out)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert np.abs(reference(**inputs).logits.numpy() - raw).max() <= 1e-5


def test_multi_label_report_by_frequency_and_calibration_in_every_evaluation(tiny, tmp_path):
    out = tmp_path / "out"
    # without the layer mix: the tiny model with it separates c2's validation texts perfectly, and such a label
    # takes the shared temperature by design (calibrate.fit_temperature); this test needs one with its own
    tiny_job(tiny, "multi", out, "--eval-every", "4", "--calibrate", "temperature", "--no-layer-mix")
    evals = [row for row in map(json.loads, open(out / "metrics.jsonl")) if row["kind"] == "eval"]
    assert len(evals) >= 2 and all(0 <= row["ece"] <= 1 and 0 <= row["brier"] <= 1 for row in evals)
    saved = json.load(open(out / "test_metrics.json"))
    counts = {name: 0 for name in ("c0", "c1", "c2")}
    for line in open(tiny["multi"][0]).readlines()[1:]:
        for label in line.strip().split(",")[-1].split(";"):
            counts[label] += 1
    buckets = metrics.frequency_buckets(list(counts.values()))
    assert list(saved["by_label_frequency"]) == list(buckets)
    assert [b["labels"] for b in saved["by_label_frequency"].values()] == [len(v) for v in buckets.values()]
    report = (out / "report.txt").read_text()
    assert "test F1 by the labels' count of training texts" in report and "calibration: a temperature per label" in report
    temperature = json.load(open(out / "config.json"))["calibration_temperature"]
    # 24 validation texts: c0 in 6 and c1 missing from 6 share a temperature; c2 (in 12, not in 12) has its own
    assert temperature[0] == temperature[1] != temperature[2]
    if importlib.util.find_spec("matplotlib"):
        assert (out / "calibration.png").stat().st_size > 1000


def test_mlm_refuses_calibration(tmp_path):
    with pytest.raises(SystemExit, match="--calibrate 'temperature' must be off with --task mlm"):
        train.main(["--task", "mlm", "--calibrate", "temperature", "--out-dir", str(tmp_path / "o")])


def test_a_finished_run_is_calibrated_later_by_resume_as_if_trained_with_it(tiny, tmp_path, capsys):
    calibrated, later = tmp_path / "calibrated", tmp_path / "later"
    tiny_job(tiny, "multi", calibrated, "--calibrate", "temperature")
    tiny_job(tiny, "multi", later)
    assert "calibration_temperature" not in json.load(open(later / "config.json"))
    state = torch.load(later / "last" / "state.pt", weights_only=True)  # the finished run kept no weights
    assert state["model"] is None and state["optimizer"] is None
    assert (later / "last" / "state.pt").stat().st_size < 2**16
    steps = len(open(later / "metrics.jsonl").readlines())
    capsys.readouterr()
    tiny_job(tiny, "multi", later, "--calibrate", "temperature", "--resume")
    said = capsys.readouterr().out
    assert "weights and optimizer moments dropped when the run finished" in said and "MiB ->" not in said
    assert len(open(later / "metrics.jsonl").readlines()) == steps  # nothing trained again
    configs = [json.load(open(folder / "config.json")) for folder in (calibrated, later)]
    assert configs[0]["calibration_temperature"] == configs[1]["calibration_temperature"]
    assert configs[0]["thresholds"] == configs[1]["thresholds"]
    saved = [json.load(open(folder / "test_metrics.json")) for folder in (calibrated, later)]
    assert saved[0] == saved[1] and saved[1]["ece"] != saved[1]["ece_uncalibrated"]
    with pytest.raises(SystemExit, match="other options"):  # what shapes training still may not change
        tiny_job(tiny, "multi", later, "--calibrate", "temperature", "--resume", "--lr", "1e-3")


def test_a_fit_at_the_edge_of_the_search_is_not_saved(tiny, tmp_path):
    """Issue 35, item 14: one validation text has no optimum (T runs to 20 or 0.05): the model is saved
    uncalibrated, and the report says why."""
    train_file, _, test_file = tiny["single"]
    one = write_texts(tmp_path / "one.csv", 1, 1)
    out = tmp_path / "out"
    train.main(["--model", tiny["model"], "--train-file", train_file, "--val-file", one, "--test-file", test_file,
                "--out-dir", str(out), "--max-length", "32", "--batch-size", "8", "--max-steps", "2", "--calibrate",
                "temperature"])
    assert "calibration_temperature" not in json.load(open(out / "config.json"))
    assert ("calibration: none; the 1 validation text(s) give the temperature no optimum"
            in (out / "report.txt").read_text())
    assert calibrate.fit_temperature(np.array([[2.0, 0.0]]), np.array([0]), multi_label=False) is None
