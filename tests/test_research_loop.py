"""The research loop on tiny runs, each read back with the package's own reader: train.py --report-to (TensorBoard's
event reader, MLflow's client) across a --resume, scripts/sweep.py (Optuna's study) killed mid-trial and run
again, and scripts/seeds.py --folds."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import train
from data import read_table
from test_robustness import tiny_checkpoint, write_texts

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
sys.path.insert(0, SCRIPTS)
import folds  # noqa: E402
import seeds  # noqa: E402
import sweep  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    return {"model": tiny_checkpoint(root / "model"), "train": write_texts(root / "train.csv", 40, 0),
            "test": write_texts(root / "test.csv", 9, 2), "root": root}


def log_rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


# ----------------------------------------------------------------------------- --report-to

def test_report_to_tensorboard_and_mlflow_read_back_across_a_resume(tiny, tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    job = ["--model", tiny["model"], "--train-file", tiny["train"], "--test-file", tiny["test"], "--max-length", "32",
           "--batch-size", "4", "--max-steps", "6", "--eval-every", "2", "--log-every", "1", "--lr", "2e-3",
           "--device", "cpu", "--out-dir", str(out), "--report-to", "tensorboard,mlflow"]
    # killed in its 4th step: steps 1-3 were logged, the last state is the evaluation's at step 2
    steps, real_step = [], train.train_step

    def dying_step(*args):
        if len(steps) == 3:
            raise KeyboardInterrupt
        steps.append(1)
        return real_step(*args)
    monkeypatch.setattr(train, "train_step", dying_step)
    with pytest.raises(SystemExit) as stop:
        train.main(job)
    assert stop.value.code == 130 and "interrupted (Ctrl-C)" in capsys.readouterr().err
    monkeypatch.setattr(train, "train_step", real_step)
    train.main([*job, "--resume"])
    rows = log_rows(out)

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for kind, key in (("train", "loss"), ("train", "lr"), ("eval", "macro_f1"), ("eval", "ece")):
        expected = [(r["step"], r[key]) for r in rows if r["kind"] == kind]
        got = [(e.step, e.value) for e in events.Scalars(f"{kind}/{key}")]
        assert [s for s, _ in got] == [s for s, _ in expected]  # step 3 once: the killed run's step 3 purged
        np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-6)  # TensorBoard: fp32

    saved = json.load(open(out / "mlflow_run.json"))
    assert saved["tracking_uri"].startswith("sqlite:///") and str(out / "mlruns") in saved["tracking_uri"]
    client = MlflowClient(saved["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("train.py").experiment_id])
    assert [r.info.run_id for r in runs] == [saved["run_id"]]  # the resumed run went on in the same MLflow run
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.002" and run.data.params["max_steps"] == "6" and "resume" not in run.data.params
    numbers = {f"{r['kind']}/{k}" for r in rows for k, v in r.items()
               if k not in ("kind", "step", "metric") and isinstance(v, (int, float))}
    assert set(run.data.metrics) == numbers  # every number metrics.jsonl holds, under the same names
    history = client.get_metric_history(run.info.run_id, "eval/macro_f1")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], r["macro_f1"]) for r in rows
                                                          if r["kind"] == "eval"]
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"report.txt", "test_metrics.json", "calibration.png", "metrics.jsonl"} <= artifacts


def test_report_to_a_missing_package_or_unknown_name_is_one_message(tiny, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    out = tmp_path / "never"
    with pytest.raises(SystemExit, match=r"--report-to tensorboard,mlflow: pip install mlflow-skinny$"):
        train.main(["--report-to", "tensorboard,mlflow", "--out-dir", str(out)])
    with pytest.raises(SystemExit, match="wandb unknown"):
        train.main(["--report-to", "wandb", "--out-dir", str(out)])
    assert not out.exists()  # refused before anything was written
    monkeypatch.setattr(importlib.util, "find_spec", real)
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nowhere")
    with pytest.raises(SystemExit, match="--report-to mlflow: cannot log to bogus://nowhere .*MLFLOW_TRACKING_URI"):
        train.main(["--model", tiny["model"], "--train-file", tiny["train"], "--test-file", "", "--max-length", "32",
                    "--device", "cpu", "--out-dir", str(out), "--report-to", "mlflow"])


# ----------------------------------------------------------------------------- the sweep

def test_sweep_search_space_is_shown_and_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sweep.parse_args(["-h"])
    assert "lr = {log = [1e-5, 1e-4]}" in capsys.readouterr().out
    assert {"pooling", "num_layers"} <= set(sweep.read_space(None, multi_label=True))
    assert "pooling" not in sweep.read_space(None, multi_label=False)
    space = tmp_path / "space.toml"
    for text, message in [("lr = {log = [0, 1e-4]}", "above 0"),
                          ("warmup_ratio = {float = [0.0, 2.0]}", "--warmup-ratio 2.0 must be between 0 and 1"),
                          ("lrr = {log = [1e-5, 1e-4]}", "not a train.py option"),
                          ('out_dir = {choice = ["a"]}', "not a train.py option"),
                          ("lr = [1e-5, 1e-4]", "KIND"), ("epochs = {int = [3, 1]}", "low < high"),
                          ("lr = {log = [1e-5", "not valid TOML")]:
        space.write_text(text)
        with pytest.raises(SystemExit, match=message):
            sweep.read_space(str(space), False)


def test_a_trial_behind_is_pruned_and_says_so(tiny, tmp_path, capsys):
    optuna = pytest.importorskip("optuna")

    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True
    args, job = sweep.parse_args(["--trials", "1", "--out-dir", str(tmp_path), "--", "--model", tiny["model"],
                                  "--train-file", tiny["train"], "--max-length", "32", "--batch-size", "4",
                                  "--max-steps", "200", "--eval-every", "2", "--device", "cpu"])
    study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
    study.optimize(sweep.Objective(args, job, {"lr": ("log", [1e-4, 1e-3])}, maximize=True, poll_seconds=0.05),
                   n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["note"].startswith("pruned at epoch") and "pruned at epoch" in capsys.readouterr().out
    rows = log_rows(tmp_path / "trial-0")
    assert 1 <= sum(r["kind"] == "eval" for r in rows) and rows[-1]["step"] < 200  # stopped, not run to the end
    assert not (tmp_path / "trial-0" / "last").exists()


def sweep_job(tiny):
    """A tiny train.py job for a sweep: 30 steps, an evaluation every 5."""
    return ["--model", tiny["model"], "--train-file", tiny["train"], "--test-file", tiny["test"], "--max-length", "32",
            "--max-steps", "30", "--eval-every", "5", "--log-every", "5", "--device", "cpu"]


def wait_for(path, process, seconds):
    """Until path exists (a trial's saved state), while process runs."""
    deadline = time.time() + seconds
    while not path.exists():
        assert process.poll() is None and time.time() < deadline, f"the sweep ended or took too long before {path}"
        time.sleep(0.05)


def test_sweep_killed_mid_trial_and_run_again(tiny, tmp_path):
    optuna = pytest.importorskip("optuna")
    space = tmp_path / "space.toml"
    space.write_text('lr = {log = [1e-4, 3e-3]}\nbatch_size = {choice = [4, 8]}\n')
    out = tmp_path / "sweep"
    job = sweep_job(tiny)
    command = ["--trials", "1", "--out-dir", str(out), "--space", str(space), "--heartbeat", "1", "--", *job]
    sweeping = subprocess.Popen([sys.executable, os.path.join(SCRIPTS, "sweep.py"), *command],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "trial-0" / "metrics.jsonl"
    wait_for(out / "trial-0" / "last" / "state.pt", sweeping, 240)  # its first evaluation saved
    sweeping.send_signal(signal.SIGKILL)  # no clean-up at all: only the heartbeat tells
    sweeping.wait()
    size = first.stat().st_size
    time.sleep(2.5)  # > 2 heartbeats: the trial is stale; and its train.py, ended with the sweep, wrote no more
    assert first.stat().st_size == size and not (out / "trial-0" / "report.txt").exists()

    handler = signal.getsignal(signal.SIGTERM)
    try:
        best = sweep.main([*command[:1], "2", *command[2:]])  # again, with a larger --trials
    finally:
        signal.signal(signal.SIGTERM, handler)
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out}/study.db")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 2 and states.count("FAIL") == 1
    killed = next(t for t in study.trials if t.state.name == "FAIL")
    rerun = next(t for t in study.trials if t.number > killed.number and t.user_attrs["folder"] == "trial-0")
    assert killed.number == 0 and rerun.params == killed.params and rerun.state.name == "COMPLETE"
    assert "resuming at step" in (out / "trial-0.log").read_text()  # went on from the killed run's last evaluation
    assert rerun.value == max(r["macro_f1"] for r in log_rows(out / "trial-0") if r["kind"] == "eval")
    for t in study.trials:  # no trial read the test file
        if t.state.name == "COMPLETE":
            saved = json.load(open(out / t.user_attrs["folder"] / "train_config.json"))
            assert saved["test_file"] == "" and not (out / t.user_attrs["folder"] / "test_metrics.json").exists()

    assert best.number == study.best_trial.number
    cfg = train.parse_config(["--config", str(out / "best.toml")])
    assert (cfg.lr, cfg.batch_size) == (best.params["lr"], best.params["batch_size"])
    assert cfg.test_file == os.path.abspath(tiny["test"]) and cfg.max_steps == 30 and cfg.device == "cpu"
    assert cfg.out_dir == str(out / "best")
    table = (out / "trials.md").read_text().splitlines()
    assert len(table) == 2 + len(study.trials) and table[2].startswith(f"| {best.number} | complete |")


def test_a_stopped_sweep_writes_the_table_and_the_best_so_far(tiny, tmp_path):
    optuna = pytest.importorskip("optuna")
    space = tmp_path / "space.toml"
    space.write_text('lr = {log = [1e-4, 3e-3]}\n')
    out = tmp_path / "sweep"
    job = sweep_job(tiny)
    sweeping = subprocess.Popen([sys.executable, os.path.join(SCRIPTS, "sweep.py"), "--trials", "3", "--out-dir",
                                 str(out), "--space", str(space), "--", *job],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "trial-1" / "last" / "state.pt", sweeping, 300)  # trial 0 finished, trial 1 evaluated once
    sweeping.send_signal(signal.SIGTERM)
    stdout, stderr = sweeping.communicate(timeout=120)
    assert sweeping.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM") and "Traceback" not in stderr
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out}/study.db")
    first = study.trials[0]
    assert first.state.name == "COMPLETE" and f"trial {first.number}: validation" in stdout
    table = (out / "trials.md").read_text().splitlines()
    assert table[2].startswith("| 0 | complete |") and len(table) == 2 + len(study.trials)
    assert train.parse_config(["--config", str(out / "best.toml")]).lr == first.params["lr"]


# ----------------------------------------------------------------------------- k-fold cross-validation

def test_folds_are_stratified_disjoint_and_written_as_read(tmp_path):
    pytest.importorskip("sklearn")
    labels = [f"c{i % 3}" for i in range(20)] + ["rare"]
    splits = folds.fold_indices(labels, False, 4, seed=0)
    held = np.concatenate([test for _, test in splits])
    assert sorted(held) == list(range(21))  # every row tested once
    for train_rows, test_rows in splits:
        assert not set(train_rows) & set(test_rows)
        assert {labels[i] for i in test_rows} >= {"c0", "c1", "c2"}  # 6-7 rows a class: each fold tests each

    pytest.importorskip("iterstrat")
    rng = np.random.default_rng(0)
    multi = [[name for name in ("a", "b", "c", "d") if rng.random() < 0.4] or ["a"] for _ in range(40)]
    for _, test_rows in folds.fold_indices(multi, True, 4, seed=0):
        counts = {name: sum(name in multi[i] for i in test_rows) for name in "abcd"}
        totals = {name: sum(name in row for row in multi) for name in "abcd"}
        assert all(abs(counts[n] - totals[n] / 4) <= 1.5 for n in "abcd")  # each label spread evenly

    source = tmp_path / "multi.csv"
    source.write_text('note,codes\n"first, with a comma",a;b\nsecond,c\nthird,a\n"a ""quoted""\nline",b\n'
                      'fifth,c;a\nsixth,b\n')
    cfg = train.TrainConfig(train_file=str(source), text_column="note", label_column="codes")
    paths, is_multi = folds.write_folds(cfg, 2, 0, str(tmp_path / "out"))
    original = read_table(source, "note", "codes")
    rows = []
    for train_path, test_path in paths:
        tested = read_table(test_path, "note", "codes", multi_label=True)
        rows += list(zip(tested.texts, tested.labels))
        assert len(read_table(train_path, "note", "codes", True).texts) + len(tested.texts) == 6
    assert is_multi and sorted(rows) == sorted(zip(original.texts, original.labels))
    other = tmp_path / "other.csv"
    other.write_text("note,codes\nx,a\ny,b\n")
    with pytest.raises(SystemExit, match="folds of other data"):
        folds.write_folds(train.TrainConfig(train_file=str(other), text_column="note", label_column="codes"), 2, 0,
                          str(tmp_path / "out"))


def test_seeds_over_folds_table_and_baseline(tiny, tmp_path):
    pytest.importorskip("sklearn")
    job = ["--model", tiny["model"], "--train-file", tiny["train"], "--max-length", "32", "--batch-size", "4",
           "--epochs", "1", "--lr", "2e-3", "--val-fraction", "0.25", "--device", "cpu"]
    root = tmp_path / "cv"
    table = seeds.main(["--folds", "2", "--seeds", "3", "--out-dir", str(root), "--", *job])
    for k in range(2):
        run = root / f"fold-{k}-seed-3"
        saved = json.load(open(run / "train_config.json"))
        assert saved["test_file"] == str(root / "folds" / f"fold-{k}" / "test.jsonl") and saved["seed"] == 3
        assert table["macro_f1"]["per_seed"][f"fold {k}"] == json.load(open(run / "test_metrics.json"))["macro_f1"]
        baseline = json.load(open(root / f"baseline-fold-{k}-seed-3.json"))
        assert table["macro_f1"]["baseline"]["per_seed"][f"fold {k}"] == baseline["macro_f1"]
    tested = sum(len(read_table(root / "folds" / f"fold-{k}" / "test.jsonl").texts) for k in range(2))
    assert tested == 40  # every training row tested once
    assert (root / "seeds.md").read_text().startswith("| metric | fold 0 | fold 1 | mean ± std")

    # --folds and --seeds combine: a run per fold and seed, the folds the same for every seed
    args, rest = seeds.parse_args(["--folds", "2", "--seeds", "0,1", "--out-dir", str(root), "--", *job])
    runs = seeds.planned_runs(args, rest, seeds.check_job(rest, args.folds))
    assert [(key, seed, os.path.basename(folder)) for key, seed, folder, _, _ in runs] == [
        ("fold 0 seed 0", 0, "fold-0-seed-0"), ("fold 0 seed 1", 1, "fold-0-seed-1"),
        ("fold 1 seed 0", 0, "fold-1-seed-0"), ("fold 1 seed 1", 1, "fold-1-seed-1")]
    assert runs[0][3] == runs[1][3] and runs[0][4].test_file.endswith("fold-0/test.jsonl")


def test_tracker_files_follow_the_run_that_owns_the_folder(tmp_path):
    from side import options
    out = tmp_path / "out"
    (out / "tensorboard").mkdir(parents=True)
    (out / "mlflow_run.json").write_text("{}")
    # killed before its first evaluation: --resume starts it again; a new run must --overwrite (they go with it)
    assert options.old_run_outputs(str(out), resume=True) == []
    assert options.old_run_outputs(str(out), resume=False) == ["tensorboard", "mlflow_run.json"]


def test_a_continued_study_with_the_same_sampler_seed_draws_new_options(tmp_path):
    """Run again with the same --sampler-seed, a study once drew the options of that seed's first run again: trials
    it had already run."""
    optuna = pytest.importorskip("optuna")
    args, _ = sweep.parse_args(["--trials", "4", "--sampler-seed", "1", "--out-dir", str(tmp_path)])
    space = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-4, log=True)}

    def draw_two():
        study = sweep.open_study(args, "maximize", {"train_options": [], "space": "x"})
        drawn = [study.ask(space) for _ in range(2)]
        for trial in drawn:
            study.tell(trial, 0.5)
        return [trial.params["lr"] for trial in drawn]
    first, second = draw_two(), draw_two()
    assert len(set(first + second)) == 4
    assert sweep.continued_seed(1, 0) == sweep.continued_seed(1, 0) != sweep.continued_seed(1, 2)
