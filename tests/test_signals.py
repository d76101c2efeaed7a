"""SIGINT (Ctrl-C) and SIGTERM (a kill, a scheduler's preemption notice) at chosen moments of train.py, predict.py and
scripts/seeds.py (issue 35): one message and no traceback, the exit status a shell gives a process the signal ended,
and the command the message advises ends as an uninterrupted run. The signals are real: sent to processes started
with SIGINT at its default (a background process of a non-interactive shell ignores it), or sent by the process to
itself from a hook at the exact moment (inside torch.save, before a rename). Also: stdout closed by its reader."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import predict
import train
from faultpoints import advised_argv
from test_robustness import ROOT, assert_same_run, job, last_state, tiny, uninterrupted, write_texts  # noqa: F401

DEFAULT_SIGINT = dict(preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
RESUME = re.compile(r"Run the same command with --resume: it continues from the last checkpoint, .*/last/state.pt "
                    r"\(step (\d+)\)$")
WHAT = {signal.SIGINT: "interrupted (Ctrl-C)",
        signal.SIGTERM: "stopped by SIGTERM (a kill, or a scheduler's notice before it preempts the job)"}

# A script run as __main__ (quiet_start acts) after hooks that send the process `SIG` itself at a chosen moment:
# HOOK names it (import: as torch begins to load; save: at the 3rd write inside the 2nd torch.save, the training
# state at step 4; replace: before the 3rd rename of a file under the out-dir, inside the first model save; and
# `twice`: a second signal, SIGINT, as the clean-up leaves the process group, as a second Ctrl-C would come).
HOOKED = """
import os, runpy, signal, sys
SIG, HOOK, TWICE, SCRIPT = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "twice", sys.argv[4]
sys.argv = sys.argv[4:]

def send():
    os.kill(os.getpid(), SIG)

if TWICE:
    import side.distributed
    leave_group = side.distributed.leave_group

    def leave_after_a_second_signal():
        os.kill(os.getpid(), signal.SIGINT)
        leave_group()
    side.distributed.leave_group = leave_after_a_second_signal

class AtImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and HOOK == "import":
            sys.meta_path.remove(self)
            send()
sys.meta_path.insert(0, AtImport())
if HOOK == "save":
    import torch
    real_save, saves = torch.save, []

    class Writes:
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, data):
            self.n += 1
            if self.n == 3:
                send()
            return self.f.write(data)
        def __getattr__(self, name):
            return getattr(self.f, name)

    def save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) != 2:
            return real_save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as handle:
                return real_save(obj, Writes(handle), *args, **kwargs)
        return real_save(obj, Writes(f), *args, **kwargs)
    torch.save = save
if HOOK == "replace":
    real_replace, renames = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if "/out" in str(dst):
            renames.append(1)
            if len(renames) == 3:
                send()
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
runpy.run_path(SCRIPT, run_name="__main__")
"""


def hooked(sig, hook, argv, twice=False, script="train.py"):
    """(exit status, stdout, stderr) of script run with argv and the hook sending sig."""
    done = subprocess.run([sys.executable, "-c", HOOKED, str(int(sig)), hook, "twice" if twice else "once",
                           os.path.join(ROOT, script), *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          **DEFAULT_SIGINT)
    return done.returncode, done.stdout, done.stderr


def one_message(stderr, sig):
    """The stderr of a stopped run: exactly one line, naming the signal; no traceback."""
    assert "Traceback" not in stderr and "Error" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(WHAT[sig]), stderr
    return lines[0]


def test_a_signal_while_torch_loads_is_one_line(tiny, tmp_path):
    status, _, stderr = hooked(signal.SIGINT, "import", job(tiny, tmp_path / "out"))
    assert status == 130 and one_message(stderr, signal.SIGINT) == (
        "interrupted (Ctrl-C) while starting: nothing was written"), stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig, hook, twice", [(signal.SIGINT, "save", False), (signal.SIGTERM, "save", True),
                                              (signal.SIGTERM, "replace", False)])
def test_a_signal_during_a_save_finishes_it_and_resumes(tiny, uninterrupted, tmp_path, sig, hook, twice):
    """The issue's case: Ctrl-C inside torch.save of last/state.pt was `RuntimeError: [enforce fail at
    inline_container.cc]`; a second Ctrl-C during the clean-up another traceback. Now the save ends first, the
    message names it, and the advised --resume ends with the uninterrupted run's weights."""
    argv = job(tiny, tmp_path / "out")
    status, _, stderr = hooked(sig, hook, argv, twice)
    message = one_message(stderr, sig)
    assert status == 128 + sig
    step = int(RESUME.search(message).group(1))
    assert step == last_state(tmp_path / "out")["step"] == (4 if hook == "save" else 2), message
    train.main(advised_argv(argv, message))
    assert_same_run(tmp_path / "out", uninterrupted)


def test_sigterm_mid_training_says_so_and_resumes(tiny, uninterrupted, tmp_path):
    """SIGTERM (what SLURM sends before it preempts a job) ended training with no message at all."""
    out = tmp_path / "out"
    slow = ("import sys, time, runpy, train\nstep = train.optimizer_step\n"
            "train.optimizer_step = lambda *a: (time.sleep(0.2), step(*a))[1]\ntrain.main(sys.argv[1:])")
    process = subprocess.Popen([sys.executable, "-c", slow, *job(tiny, out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not os.path.exists(out / "last" / "state.pt") and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stderr = process.communicate(timeout=600)[1]
    message = one_message(stderr, signal.SIGTERM)
    assert process.returncode == 143 and int(RESUME.search(message).group(1)) < 14, message
    train.main(advised_argv(job(tiny, out), message))
    assert_same_run(out, uninterrupted)


# ----------------------------------------------------------------------------- predict.py

@pytest.fixture(scope="module")
def notes(tiny, uninterrupted):
    """400 rows in chunks of 20, and the uninterrupted run's predictions of them."""
    root = tiny["root"]
    notes = write_texts(root / "notes.csv", 400, 5)
    whole = root / "whole.csv"
    argv = ["--model", str(uninterrupted), "--input", notes, "--chunk-rows", "20", "--batch-size", "4"]
    predict.main([*argv, "--output", str(whole)])
    return {"argv": argv, "whole": whole.read_bytes()}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_predict_stopped_mid_run_resumes_to_the_same_bytes(notes, tmp_path, sig):
    output = tmp_path / "labels.csv"
    argv = [*notes["argv"], "--output", str(output)]
    slow = ("import sys, time, runpy\nimport side.output as o\ncommit = o.ChunkWriter.commit\n"
            "o.ChunkWriter.commit = lambda *a, **k: (time.sleep(0.2), commit(*a, **k))[1]\n"
            "sys.argv = sys.argv[1:]\nrunpy.run_path('predict.py', run_name='__main__')")
    process = subprocess.Popen([sys.executable, "-c", slow, "predict.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, **DEFAULT_SIGINT)
    deadline = time.time() + 600
    while not os.path.exists(f"{output}.resume.json") and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(sig)
    stderr = process.communicate(timeout=600)[1]
    message = one_message(stderr, sig)
    assert process.returncode == 128 + sig and message.endswith(
        "The complete chunks are kept: run the same command with --resume to go on after them"), message
    assert not output.exists()
    predict.main(advised_argv(argv, message))
    assert output.read_bytes() == notes["whole"]


def test_predict_into_a_reader_that_stops_ends_quietly(notes):
    """`predict.py ... | head -1` ended in BrokenPipeError; now as a Unix tool ends: no word, status 141."""
    process = subprocess.Popen([sys.executable, "predict.py", *notes["argv"]], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("{")
    process.stdout.close()  # as `head -1` does once it has its line
    stderr = process.stderr.read()
    assert process.wait(timeout=600) == 141 and "Traceback" not in stderr and "Error" not in stderr, stderr


# ----------------------------------------------------------------------------- scripts/seeds.py

def test_seeds_interrupted_is_one_message_and_goes_on(tiny, tmp_path):
    """Ctrl-C in seeds.py was a traceback (only SIGTERM was handled). The terminal sends it to the whole group: the
    script and its train.py run; both stop with one message each (the run's in its log), and the same command
    then finishes the seed from its last checkpoint."""
    out = tmp_path / "seeds"
    train_args = ["--model", tiny["model"], "--train-file", tiny["train"], "--val-file", tiny["val"], "--test-file",
                  tiny["val"], "--max-length", "32", "--batch-size", "4", "--epochs", "4", "--eval-every", "2",
                  "--lr", "2e-3"]
    command = [sys.executable, "scripts/seeds.py", "--seeds", "0", "--no-baseline", "--out-dir", str(out), "--",
               *train_args]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **DEFAULT_SIGINT)
    deadline = time.time() + 600
    while not os.path.exists(out / "seed-0" / "last" / "state.pt") and process.poll() is None and \
            time.time() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)  # as the terminal's Ctrl-C: to every process of the group
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 130 and one_message(stderr, signal.SIGINT) == (
        "interrupted (Ctrl-C). Run the same command again: finished seeds are skipped, an interrupted one continues "
        "from its last checkpoint (--resume)"), stderr
    log = open(out / "seed-0.log").read()
    assert "Traceback" not in log and re.search(r"interrupted \(Ctrl-C\)\. Run the same command with --resume", log)
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "seed 0: interrupted, continues (--resume)" in again.stdout, again.stderr
    assert (out / "seed-0" / "test_metrics.json").exists()


# ----------------------------------------------------------------------------- side/signals.py itself

def test_a_signal_inside_held_acts_after_it_and_a_second_is_ignored(capsys):
    """In this process, with real signals: the block ends whole, then one SystemExit with one message."""
    from side import signals
    done = []

    @signals.stopping("Run it again")
    def job():
        with signals.held():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the block ended")
        done.append("after the block")  # never: the signal acts first
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stop:
        job()
    assert stop.value.code == 143 and done == ["the block ended"]
    assert capsys.readouterr().err == f"{WHAT[signal.SIGTERM]}. Run it again\n"
    assert signal.getsignal(signal.SIGINT) is before  # the handlers from before are back


def test_on_a_terminal_the_message_starts_a_line_of_its_own(monkeypatch, capsys):
    """Not glued to the progress line: `eta 42.4 min^Cinterrupted` (issue 38, item 9)."""
    from side import signals
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with pytest.raises(SystemExit):
        with signals.stopping():
            raise KeyboardInterrupt
    assert capsys.readouterr().err == f"\n{WHAT[signal.SIGINT]}. Run the same command again\n"
