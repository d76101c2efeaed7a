"""Every write point of predict.py and train.py failed in a test (issue 35), as SQLite's crash and I/O-error tests
fail every I/O call in turn: tests/faultpoints.py counts the calls a run makes on its output location (opening for
writing, write, flush, close, fsync, truncate, rename, remove, mkdir), then for each of them and each fault (kill -9 right there,
ENOSPC, EIO) runs the job once with that one call failing, then the command its message advises (after a kill: the
same command with --resume), and checks three things: the outputs are byte for byte an uninterrupted run's (the
weights, for training), a file that was there before is untouched (or, once the run got that far, the new
version), and no traceback was printed."""
import contextlib
import os
import shutil

import pytest

import predict
import train
from side import logs
from faultpoints import FAULTS, advised_argv, files_of, in_parallel, run
from test_robustness import tiny_checkpoint, write_texts

BYSTANDER = b"a file of the user's beside the output\n"
OLD_OUTPUT = b"an older run's predictions\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, a few rows, and TOKENIZERS_PARALLELISM set before the forks (the tokenizer's threads do not
    survive a fork: it would warn on stderr)."""
    root = tmp_path_factory.mktemp("points")
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    model = tiny_checkpoint(root / "model")
    data = {name: write_texts(root / f"{name}.csv", n, seed) for name, n, seed in
            (("train", 8, 0), ("val", 4, 1), ("test", 4, 2))}
    notes = root / "notes.csv"
    lines = open(data["train"]).read().splitlines()
    notes.write_text("\n".join(lines[:3] + [","] + lines[3:6]) + "\n")  # 6 rows and one without text (rejects)
    yield {"root": root, "model": model, **data, "notes": str(notes)}
    if parallelism is None:
        del os.environ["TOKENIZERS_PARALLELISM"]
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = parallelism


def snapshot(*paths):
    return {path: files_of(path) if os.path.isdir(path) else open(path, "rb").read() for path in paths}


WORKERS = max(1, min(2, len(os.sched_getaffinity(0))))  # cases at a time: CI has 2 cores


def check_points(entry, argv_for, folder, before, reads, compared):
    """Run entry(argv_for(folder)) uninterrupted, then once per (point, fault); returns the number of points.
    folder: the output location, made afresh from `before` ({name: bytes}) for each run (each worker has its own:
    folder-0, folder-1); reads: the files and folders the run reads, which must never change; compared(files): the
    part of the folder's files (relative name -> bytes) that must equal the uninterrupted run's."""
    read_before = snapshot(*reads)
    fresh(folder, before)
    with contextlib.suppress(SystemExit):  # once here: what the run imports on its way is imported once, not per child
        entry(argv_for(folder))
    fresh(folder, before)
    reference = run(entry, argv_for(folder), folder)
    assert reference.calls and "Traceback" not in reference.stderr, reference.stderr
    expected = compared(files_of(folder))
    points = len(reference.calls)
    cases = [(point, fault) for point in range(1, points + 1) for fault in FAULTS]

    def case(point, fault):
        def check(slot):
            where = f"{folder}-{slot}"
            fresh(where, before)
            return check_one(entry, argv_for(where), where, point, fault, reference, expected, before, compared)
        return check
    failures = [f for f in in_parallel([case(*c) for c in cases], WORKERS) if f]
    assert snapshot(*reads) == read_before, "a file the run reads was changed"
    assert not failures, (f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:3]) + "\n"
                          + "\n".join(f.splitlines()[0] for f in failures[3:]))
    return points


def fresh(folder, before):
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for name, data in before.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def check_one(entry, argv, folder, point, fault, reference, expected, before, compared):
    """What went wrong in one case (None: nothing): the faulty run, then the command it advises."""
    what, path = reference.calls[point - 1]
    case = f"point {point} ({what} {path}), {fault}"
    failed = run(entry, argv, folder, point, fault)
    if "Traceback" in failed.stderr:
        return f"{case}: a traceback\n{failed.stderr}"
    now = files_of(folder)
    changed = [name for name, data in before.items() if now.get(name) not in (data, expected.get(name))]
    if changed:
        return f"{case}: {changed} changed by the failed run"
    if failed.status == reference.status:
        second = failed  # the fault did not stop it (a clean-up that may fail)
    else:
        message = failed.stderr.strip().splitlines()[-1] if failed.stderr.strip() else ""
        try:
            again = argv + ["--resume"] if fault == "kill" else advised_argv(argv, message)
        except AssertionError as e:
            return f"{case}: {e}"
        second = run(entry, again, folder)
        case += f", then {' '.join(again[len(argv):]) or 'the same command'}"
    if second.status != reference.status or "Traceback" in second.stderr:
        return f"{case}: exit status {second.status} (uninterrupted: {reference.status})\n{second.stderr[-1500:]}"
    got = compared(files_of(folder))
    if got != expected:
        differ = sorted(name for name in set(got) | set(expected) if got.get(name) != expected.get(name))
        return f"{case}: the outputs differ from an uninterrupted run's: {differ}"
    return None


def test_every_write_point_of_predict(setup, capsys):
    """--output with rows set aside (a rejects file), an older output at the same path, a file of the user's beside
    it; chunks of 2 rows."""
    model = str(setup["root"] / "trained")
    train.main(["--model", setup["model"], "--train-file", setup["train"], "--val-file", setup["val"],
                "--test-file", "", "--out-dir", model, "--max-steps", "1", "--max-length", "16"])
    argv = lambda folder: ["--model", model, "--input", setup["notes"], "--output", os.path.join(folder, "labels.csv"),
                           "--chunk-rows", "2", "--batch-size", "2"]
    before = {"labels.csv": OLD_OUTPUT, "notes-of-mine.txt": BYSTANDER}
    # the lock file is left out: the lock is the flock on it, gone with the process; a file left (its removal
    # failed, or a kill) is taken over by the next run
    points = check_points(predict.main, argv, str(setup["root"] / "predict_out"), before, [model, setup["notes"]],
                          lambda files: {name: data for name, data in files.items() if not name.endswith(".lock")})
    with capsys.disabled():
        print(f"\npredict.py: {points} write points x {len(FAULTS)} faults ({', '.join(FAULTS)}): all pass")
    assert points > 10


def test_every_write_point_of_train(setup, capsys, monkeypatch):
    """Two evaluations (each saves the best model and last/state.pt), the log and the test report. Compared: the
    weights, the config, the log and the test metrics (the report holds timings). The curves are left out (as
    without matplotlib): drawing them would take most of the time, and they are written as the report is."""
    monkeypatch.setattr(logs, "pyplot", lambda missing: None)
    argv = lambda folder: ["--model", setup["model"], "--train-file", setup["train"], "--val-file", setup["val"],
                           "--test-file", setup["test"], "--out-dir", folder, "--max-steps", "2", "--eval-every", "1",
                           "--batch-size", "4", "--max-length", "16", "--log-every", "1"]
    compared = lambda files: {name: files.get(name) for name in ("model.safetensors", "config.json",
                                                                 "metrics.jsonl", "test_metrics.json")}
    reads = [setup["model"], setup["train"], setup["val"], setup["test"]]
    points = check_points(train.main, argv, str(setup["root"] / "train_out"), {}, reads, compared)
    with capsys.disabled():
        print(f"\ntrain.py: {points} write points x {len(FAULTS)} faults ({', '.join(FAULTS)}): all pass")
    assert points > 10


def test_the_harness_finds_a_file_written_in_place(tmp_path):
    """The harness itself: a job that rewrites its output in place (no temp, no rename) is caught, a kill or an
    error leaving the old file torn."""
    def in_place(argv):
        try:
            with open(argv[0], "w") as f:
                f.write("the new report\n")
        except OSError as e:
            raise SystemExit(f"cannot write {argv[0]}: {e.strerror}; run the same command again") from None

    folder = str(tmp_path / "out")
    # open truncates it: a kill or an error at its write, a kill at its close (before the flush) leave it empty
    with pytest.raises(AssertionError, match=r"^4 of 9 cases failed:\n  point 2 \(write report.txt\), kill: "
                                             r"\['report.txt'\] changed by the failed run"):
        check_points(in_place, lambda where: [os.path.join(where, "report.txt")], folder,
                     {"report.txt": b"the old report\n"}, [], lambda files: files)
