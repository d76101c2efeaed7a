"""scripts/bootstrap.py: the paired test-set bootstrap that says whether a test set can tell two recipes apart."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import bootstrap  # noqa: E402


def one_hot(ids, classes):
    return np.eye(classes)[ids]


@pytest.mark.parametrize("multi_label", [False, True])
def test_f1_of_the_whole_test_set_is_sklearns_and_a_weight_counts_as_copies(multi_label):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    if multi_label:
        truth, decided = (rng.random((40, 6)) < 0.3).astype(float), (rng.random((40, 6)) < 0.3).astype(float)
        truth[:, 5] = decided[:, 5] = 0  # a label nobody has or predicts scores 0
        y, p, extra = truth, decided, {}
    else:
        y, p = rng.integers(0, 4, 40), rng.integers(0, 4, 40)  # class 4 of 5 never occurs: it scores 0 in the macro
        truth, decided, extra = one_hot(y, 5), one_hot(p, 5), {"labels": range(5)}
    scores = bootstrap.f1_scores(np.ones((1, 40)), decided, truth)
    for average in ("micro", "macro"):
        expected = metrics.f1_score(y, p, average=average, zero_division=0, **extra)
        assert abs(scores[f"{average}_f1"][0] - expected) < 1e-12
    weights = rng.integers(0, 3, (1, 40)).astype(float)
    copies = np.repeat(np.arange(40), weights[0].astype(int))
    by_copies = bootstrap.f1_scores(np.ones((1, len(copies))), decided[copies], truth[copies])
    by_weights = bootstrap.f1_scores(weights, decided, truth)
    for key in by_copies:
        assert abs(by_copies[key][0] - by_weights[key][0]) < 1e-12


def test_the_table_scores_each_run_as_train_py_did_and_a_system_against_itself_differs_by_zero(tmp_path, capsys):
    from test_robustness import tiny_checkpoint, write_texts
    from train import TrainConfig
    from train import train as run
    model = tiny_checkpoint(tmp_path / "model")
    data = {name: write_texts(tmp_path / f"{name}.csv", rows, seed) for name, rows, seed in
            (("train", 24, 0), ("val", 6, 1), ("test", 15, 2))}
    runs = []
    for seed in (0, 1):
        runs.append(str(tmp_path / f"run-{seed}"))
        run(TrainConfig(model=model, train_file=data["train"], val_file=data["val"], test_file=data["test"],
                        max_steps=3, max_length=32, batch_size=4, lr=1e-3, seed=seed, out_dir=runs[-1]))
    out = tmp_path / "table.md"
    bootstrap.main(["--test-file", data["test"], "--samples", "200", "--out", str(out),
                    f"one={runs[0]}", f"same={runs[0]}", f"both={runs[0]},{runs[1]}"])
    macro_table = open(out).read().split("| system | runs | macro_f1")[1]
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ") for line in macro_table.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")}
    tested = [json.load(open(os.path.join(r, "test_metrics.json")))["macro_f1"] for r in runs]
    assert abs(float(rows["one"][2]) - tested[0]) < 1e-4
    assert abs(float(rows["both"][2]) - np.mean(tested)) < 1e-4
    assert rows["same"][5:7] == ["+0.0000", "0.0000 to 0.0000"]
    low, high = map(float, rows["one"][3].split(" to "))
    assert low <= float(rows["one"][2]) <= high and low < high  # 15 texts leave a wide interval
    assert rows["both"][4] != "-" and rows["one"][4] == "-"


@pytest.mark.parametrize("system, message", [("nodir", "expected NAME=RUN_DIR"), ("a=", "expected NAME=RUN_DIR"),
                                             ("a=/nonexistent", "no config.json")])
def test_a_bad_system_is_one_line(tmp_path, capsys, system, message):
    with pytest.raises(SystemExit) as stop:
        bootstrap.main(["--test-file", str(tmp_path / "t.csv"), system])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_an_out_file_the_script_reads_or_cannot_write_is_refused_before_any_work(tmp_path, capsys):
    """bootstrap.py, linear_baseline.py and layer_probe.py: --out onto an input, into a run folder or into a
    missing folder ends in one line before anything is read or written; the input is left as it was."""
    import layer_probe
    import linear_baseline
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    test = tmp_path / "test.csv"
    test.write_text("text,label\na,b\n")
    cases = [(bootstrap, ["--test-file", str(test), "--out", str(test), f"a={run}"], "is the --test-file"),
             (bootstrap, ["--test-file", str(test), "--out", str(run / "config.json"), f"a={run}"],
              "lies inside the run folder of a"),
             (bootstrap, ["--test-file", str(test), "--out", str(tmp_path / "no" / "t.md"), f"a={run}"],
              "the folder " + str(tmp_path / "no") + " does not exist"),
             (bootstrap, ["--test-file", str(test), f"a={run}", f"a={run}"], "a given twice"),
             (linear_baseline, ["--train-file", str(test), "--test-file", str(test), "--out", str(test)],
              "is the --train-file"),
             (layer_probe, ["--train-file", str(test), "--out", str(test)], "is the --train-file")]
    for script, argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            script.main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err, (script.__name__, argv)
    assert test.read_text() == "text,label\na,b\n" and (run / "config.json").read_text() == "{}"
