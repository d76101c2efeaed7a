"""--val-fraction 0 (issue #37): no validation split, every training text trained on, the last step's model kept;
the options that need validation data refused up front; the report, logs, baseline and seeds table without it."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import train
from model import EncoderClassifier
from side import options
from test_robustness import last_state, log_rows, tiny_checkpoint, write_texts

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import linear_baseline  # noqa: E402
import seeds  # noqa: E402
import sweep  # noqa: E402

MULTI = ("c0;c1", "c1", "c2", "c1;c2")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    # 26 rows in batches of 4: 7 batches an epoch, the last one short
    return {"model": tiny_checkpoint(root / "model"), "train": write_texts(root / "train.csv", 26, 0),
            "test": write_texts(root / "test.csv", 9, 2), "multi": write_texts(root / "multi.csv", 26, 0, MULTI),
            "multi_test": write_texts(root / "multi_test.csv", 8, 2, MULTI), "root": root}


def job(tiny, out, *extra):
    return ["--model", tiny["model"], "--train-file", tiny["train"], "--test-file", tiny["test"], "--out-dir",
            str(out), "--max-length", "32", "--batch-size", "4", "--epochs", "2", "--eval-every", "4",
            "--log-every", "1", "--lr", "2e-3", "--val-fraction", "0", "--keep-state", *extra]


def counting_rows(monkeypatch):
    """The training texts each optimizer step takes, counted as train_step is called."""
    counted, real_step = [], train.train_step

    def step(cfg, learner, objective, batches):
        counted.append(sum(len(batch["labels"]) for batch, weight in batches if weight))
        return real_step(cfg, learner, objective, batches)
    monkeypatch.setattr(train, "train_step", step)
    return counted


@pytest.fixture(scope="module")
def whole_run(tiny):
    """An uninterrupted --val-fraction 0 run: 2 epochs of 7 steps, saved at steps 4, 8, 12 and 14."""
    out = tiny["root"] / "whole"
    with pytest.MonkeyPatch.context() as monkeypatch:
        counted = counting_rows(monkeypatch)
        result = train.main(job(tiny, out))
    return out, result, counted


def test_every_training_text_is_trained_on_and_the_last_step_is_kept(whole_run):
    out, result, counted = whole_run
    assert len(counted) == 14 and sum(counted[:7]) == sum(counted[7:]) == 26  # each epoch: all 26 rows, none held out
    final = last_state(out)  # --keep-state: the weights at the last step
    assert final["step"] == 14 and final["best"] is None
    saved = EncoderClassifier.from_pretrained(str(out), verbose=False).state_dict()
    assert saved.keys() == final["model"].keys()
    assert all(torch.equal(saved[k], final["model"][k]) for k in saved), "the saved model is not the last step's"


def test_the_report_has_test_metrics_and_no_validation_numbers(whole_run):
    out, result, _ = whole_run
    assert result["best_val"] is None and result["validation"] is None and 0 <= result["test"]["accuracy"] <= 1
    saved = json.load(open(out / "test_metrics.json"))
    assert saved["validation"] is None and saved["accuracy"] == result["test"]["accuracy"]
    report = (out / "report.txt").read_text()
    assert report.startswith("no validation data (--val-fraction 0)") and "test (9 texts)" in report
    assert "validation calibration" not in report and "best validation" not in report
    assert log_rows(out, "eval") == [] and [r["step"] for r in log_rows(out, "train")] == list(range(1, 15))
    assert json.load(open(out / "train_config.json"))["val_fraction"] == 0
    assert json.load(open(out / "config.json")).get("thresholds") is None  # single-label: none


def test_a_stopped_run_resumes_to_the_same_model(tiny, whole_run, tmp_path, monkeypatch, capsys):
    """Ctrl-C at step 7 (saved at step 4); --resume ends with the uninterrupted run's model and log."""
    ref, _, _ = whole_run
    out, steps, real_step = tmp_path / "stopped", [], train.train_step

    def stopping_step(*args):
        if len(steps) == 6:
            raise KeyboardInterrupt
        steps.append(1)
        return real_step(*args)
    monkeypatch.setattr(train, "train_step", stopping_step)
    with pytest.raises(SystemExit, match="^130$"):
        train.main(job(tiny, out))
    assert "last/state.pt (step 4)" in capsys.readouterr().err and last_state(out)["step"] == 4
    monkeypatch.undo()
    train.main(job(tiny, out, "--resume"))
    ours, theirs = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert (out / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()


def test_multi_label_keeps_the_fixed_threshold_and_every_checkpoint_is_the_newest(tiny, tmp_path, capsys):
    out = tmp_path / "multi"
    train.main(job(tiny, out, "--train-file", tiny["multi"], "--test-file", tiny["multi_test"], "--eval-every", "3",
                   "--keep-checkpoints", "2", "--threshold", "0.3"))
    assert "threshold 0.3: no validation data to tune it on" in capsys.readouterr().out
    assert json.load(open(out / "config.json"))["thresholds"] == [0.3] * 3
    assert sorted(os.listdir(out / "checkpoints")) == ["step-12", "step-14"]
    newest, kept = load_file(out / "checkpoints" / "step-14" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(newest[k], kept[k]) for k in kept)
    assert json.load(open(out / "test_metrics.json"))["by_label_frequency"]


@pytest.mark.parametrize("extra,named", [(["--patience", "2"], "--patience 2"),
                                         (["--calibrate", "temperature"], "--calibrate 'temperature'"),
                                         (["--metric", "accuracy"], "--metric 'accuracy'"),
                                         (["--no-greater-is-better"], "--greater-is-better False"),
                                         (["--threshold", "per_label"], "--threshold 'per_label'"),
                                         (["--val-fraction", "-0.0", "--patience", "1"], "--patience 1")])
def test_options_that_need_validation_data_are_refused_in_one_line(tiny, tmp_path, extra, named):
    with pytest.raises(SystemExit) as refused:
        train.main(job(tiny, tmp_path / "out", *extra))
    message = str(refused.value)
    assert "\n" not in message and named in message and message.endswith("give --val-fraction > 0 or a --val-file")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_the_range_masked_lm_and_the_sweep(tiny, tmp_path):
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(SystemExit, match=r"^--val-fraction \S+ must be in \[0, 1\) \(0 = no validation data\)$"):
            train.main(job(tiny, tmp_path / "out", "--val-fraction", bad))
    with pytest.raises(SystemExit, match=r"^--val-fraction 0.0 must be in \(0, 1\) with --task mlm.*or give a "
                                         r"--val-file$"):
        train.main(job(tiny, tmp_path / "out", "--task", "mlm", "--test-file", ""))
    with pytest.raises(SystemExit, match="sweep.py tunes a classifier on its validation metric, and --val-fraction"):
        sweep.check_job(["--val-fraction", "0"])
    with_file = train.parse_config(["--val-fraction", "0", "--val-file", tiny["test"]])
    assert not options.no_validation(with_file) and options.no_validation(train.parse_config(["--val-fraction",
                                                                                               "-0.0"]))
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):  # its contract: it always splits
        data.train_val_split(10, val_fraction=0)


def test_linear_baseline_and_seeds_table_without_validation(tiny, tmp_path, capsys):
    pytest.importorskip("sklearn")
    multi = linear_baseline.main(["--train-file", tiny["multi"], "--test-file", tiny["multi_test"],
                                  "--val-fraction", "0"])
    assert "trained on all 26 training rows; multi-label threshold 0.5, not tuned" in capsys.readouterr().out
    assert multi["threshold"] == 0.5
    linear_baseline.main(["--train-file", tiny["train"], "--test-file", tiny["test"], "--val-fraction", "0"])
    assert "no validation data (--val-fraction 0): trained on all 26 training rows\n" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the range train.py allows, as one argparse line
        linear_baseline.main(["--val-fraction", "1"])
    assert "--val-fraction 1.0 must be in [0, 1)" in capsys.readouterr().err
    root = tmp_path / "runs"
    table = seeds.main(["--seeds", "0", "--out-dir", str(root), "--", "--model", tiny["model"], "--train-file",
                        tiny["train"], "--test-file", tiny["test"], "--max-length", "32", "--batch-size", "8",
                        "--max-steps", "2", "--val-fraction", "0", "--device", "cpu"])
    assert "accuracy" in table and table["accuracy"]["baseline"]["mean"] > 0
    assert not any(name.startswith("validation") for name in table)  # no column of made-up validation numbers
    assert "trained on all 26 training rows" in capsys.readouterr().out
