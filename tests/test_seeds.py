"""scripts/seeds.py: one GPU per run at a time (proven with stand-in processes), and a tiny job over 2 seeds whose
second run is interrupted and then continued by running the same command again."""
import json
import os
import shutil
import sys

import numpy as np
import pytest

import train
from test_robustness import tiny_checkpoint, write_texts

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import seeds  # noqa: E402


class StandIn:
    """A process that ends after a few polls, recording which runs were on which device meanwhile."""

    def __init__(self, seed, device, running, polls):
        self.seed, self.device, self.running, self.left, self.returncode = seed, device, running, polls, None
        running.append((seed, device))

    def poll(self):
        self.left -= 1
        if self.left <= 0:
            self.running.remove((self.seed, self.device))
            self.returncode = 0
        return self.returncode


def test_one_run_per_gpu_at_a_time():
    running, seen = [], []

    def start(command, log_path, device):
        process = StandIn(command, device, running, polls=2 + command % 3)
        seen.append(sorted(running))
        assert len({d for _, d in running}) == len(running) <= 2  # never two runs on one GPU, never a third
        return process

    codes = seeds.run_jobs([(s, s, f"log-{s}") for s in range(5)], ["0", "1"], start, poll_seconds=0)
    assert codes == {s: 0 for s in range(5)}
    assert max(len(r) for r in seen) == 2  # both GPUs busy at once
    assert {d for r in seen for _, d in r} == {"0", "1"}
    order = []
    codes = seeds.run_jobs([(s, s, "") for s in range(3)], [None],
                           lambda c, l, d: order.append(c) or StandIn(c, d, running, 1), poll_seconds=0)
    assert order == [0, 1, 2] and codes == {0: 0, 1: 0, 2: 0}  # no GPU: one after another


def test_a_process_sees_only_its_gpu(tmp_path):
    log = tmp_path / "log"
    command = [sys.executable, "-c", "import os; print('visible', os.environ['CUDA_VISIBLE_DEVICES'])"]
    assert seeds.run_jobs([(0, command, str(log))], ["3"], poll_seconds=0.05) == {0: 0}
    assert log.read_text().strip() == "visible 3"


def test_jobs_share_the_cpu_cores(tmp_path, monkeypatch):
    """--jobs 2 without a GPU: two runs at once, each told to use half the cores; refused where GPUs are."""
    monkeypatch.setattr(seeds, "visible_gpus", lambda: [None])
    monkeypatch.setattr(seeds, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    args, _ = seeds.parse_args(["--jobs", "2"])
    devices, start = seeds.run_slots(args)
    assert devices == [None, None]
    command = [sys.executable, "-c", "import os; print('threads', os.environ['OMP_NUM_THREADS'])"]
    assert seeds.run_jobs([(0, command, str(tmp_path / "log"))], devices, start, poll_seconds=0.05) == {0: 0}
    assert (tmp_path / "log").read_text().strip() == "threads 4"
    assert seeds.run_slots(seeds.parse_args([])[0])[0] == [None]  # one at a time by default
    monkeypatch.setattr(seeds, "visible_gpus", lambda: ["0", "1"])
    with pytest.raises(SystemExit, match="without a GPU"):
        seeds.run_slots(args)
    with pytest.raises(SystemExit):
        seeds.parse_args(["--jobs", "0"])


def test_a_stopped_seeds_py_stops_its_runs(tmp_path, monkeypatch):
    started = []

    def start(command, log_path, device):
        started.append(seeds.start_process(command, log_path, device))
        return started[-1]

    def interrupted(seconds):
        raise KeyboardInterrupt  # what Ctrl-C (or main's SIGTERM handler, as SystemExit) does while it waits
    monkeypatch.setattr(seeds.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        seeds.run_jobs([(0, [sys.executable, "-c", "import time; time.sleep(60)"], str(tmp_path / "log"))], [None],
                       start)
    assert started[0].returncode is not None  # terminated and waited for: nothing writes on behind our back


def test_a_run_stopped_by_a_signal_is_said_to_continue_and_no_empty_table_replaces_one(tmp_path, monkeypatch, capsys):
    """A run that SIGTERM or Ctrl-C ended (a scheduler, the user) is not called failed; and when no run has
    finished, the table another invocation wrote in the folder stays as it was."""
    command = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]
    assert seeds.run_jobs([(0, command, str(tmp_path / "log"))], [None], poll_seconds=0.05) == {0: -15}
    assert "seed 0: stopped by a signal (exit code -15): it continues" in capsys.readouterr().out
    root = tmp_path / "runs"
    root.mkdir()
    (root / "seeds.md").write_text("seed 0's table")
    monkeypatch.setattr(seeds, "run_jobs", lambda jobs, devices, start: {1: 143, 2: 1})
    with pytest.raises(SystemExit) as stop:
        seeds.main(["--seeds", "1,2", "--no-baseline", "--out-dir", str(root), "--", "--max-steps", "1"])
    assert str(stop.value.code) == (f"seed 2 failed: see their logs in {root}; seed 1 stopped by a signal: run the "
                                    "same command again to continue; the table holds no run")
    assert (root / "seeds.md").read_text() == "seed 0's table"


def test_arguments_seeds_sets_itself_are_refused():
    with pytest.raises(SystemExit):
        seeds.parse_args(["--seeds", "0,1", "--", "--seed", "3"])
    with pytest.raises(SystemExit):
        seeds.parse_args(["--", "--out-dir=x"])
    args, rest = seeds.parse_args(["--seeds", "2,5", "--", "--epochs", "1"])
    assert args.seeds == [2, 5] and rest == ["--epochs", "1"]


def test_seeds_table_and_an_interrupted_run_continued(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    model = tiny_checkpoint(tmp_path / "model")
    job = ["--model", model, "--train-file", write_texts(tmp_path / "train.csv", 40, 0), "--test-file",
           write_texts(tmp_path / "test.csv", 12, 2), "--max-length", "32", "--batch-size", "4", "--epochs", "1",
           "--eval-every", "2", "--lr", "2e-3", "--val-fraction", "0.25", "--device", "cpu"]
    root = tmp_path / "runs"
    seeds.main(["--seeds", "0,1", "--out-dir", str(root), "--", *job])
    first = {s: json.load(open(root / f"seed-{s}" / "test_metrics.json")) for s in (0, 1)}
    assert first[0] != first[1]  # the seed changed the run

    # seed 1 again, killed after its third step: its last state is from the evaluation at step 2
    shutil.rmtree(root / f"seed-1")
    steps = []
    real_step = train.train_step

    def dying_step(*args):
        if len(steps) == 3:
            raise KeyboardInterrupt
        steps.append(1)
        return real_step(*args)
    monkeypatch.setattr(train, "train_step", dying_step)
    with pytest.raises(SystemExit, match="^130$"):  # train.py's Ctrl-C: its message, then status 130
        train.main([*job, "--seed", "1", "--out-dir", str(root / "seed-1")])
    assert capsys.readouterr().err.startswith("interrupted (Ctrl-C). Run the same command with --resume")
    monkeypatch.undo()
    assert seeds.seed_state(str(root / "seed-1")) == "resume" and seeds.seed_state(str(root / "seed-0")) == "done"
    finished = os.path.getmtime(root / "seed-0" / "test_metrics.json")

    table = seeds.main(["--seeds", "0,1", "--out-dir", str(root), "--", *job])
    assert os.path.getmtime(root / "seed-0" / "test_metrics.json") == finished  # skipped
    assert "resuming at step 2" in (root / "seed-1.log").read_text()
    assert json.load(open(root / "seed-1" / "test_metrics.json")) == first[1]  # exactly the uninterrupted run's
    for name in ("macro_f1", "ece", "brier"):
        values = [first[0][name], first[1][name]]
        row = table[name]
        assert row["per_seed"] == {0: values[0], 1: values[1]}
        assert row["mean"] == pytest.approx(np.mean(values), abs=1e-15)
        assert row["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-15)
        assert (row["min"], row["max"]) == (min(values), max(values))
        baseline = [json.load(open(root / f"baseline-seed-{s}.json"))[name] for s in (0, 1)]
        assert row["baseline"]["per_seed"] == {0: baseline[0], 1: baseline[1]}
    saved = json.load(open(root / "seeds.json"))
    assert saved["seeds"] == [0, 1] and "validation.ece" in saved["metrics"]
    markdown = (root / "seeds.md").read_text().splitlines()
    assert markdown[0].startswith("| metric | seed 0 | seed 1 | mean ± std")
    assert any(line.startswith("| macro_f1 |") for line in markdown)


def test_relative_paths_mean_the_callers_folder(tmp_path, monkeypatch):
    """Run from a folder that is not the repository: the runs read and write where the caller's paths point (they
    once ran from the repository's root, where 'model' and 'train.csv' named nothing, or something else)."""
    tiny_checkpoint(tmp_path / "model")
    write_texts(tmp_path / "train.csv", 24, 0)
    write_texts(tmp_path / "test.csv", 8, 2)
    monkeypatch.chdir(tmp_path)
    table = seeds.main(["--seeds", "0", "--no-baseline", "--out-dir", "runs", "--", "--model", "model",
                        "--train-file", "train.csv", "--test-file", "test.csv", "--max-length", "16",
                        "--batch-size", "8", "--max-steps", "1", "--device", "cpu"])
    assert os.path.isfile(tmp_path / "runs" / "seed-0" / "test_metrics.json")
    assert set(table["macro_f1"]["per_seed"]) == {0}
