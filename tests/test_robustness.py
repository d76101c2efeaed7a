"""Scale and robustness: torchrun DDP/FSDP against one process, resume after a kill, atomic checkpoints,
non-finite steps, and the error messages. A tiny BERT (tests/golden/bert) on tiny made-up data keeps it fast."""
import csv
import importlib.util
import json
import os
import re
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import predict
import train
from model import EncoderClassifier
from side import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_BERT = os.path.join(ROOT, "tests", "golden", "bert")
WORDS = [f"w{i}" for i in range(60)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_texts(path, n, seed, labels=("c0", "c1", "c2")):
    """Rows whose words lean towards their label's third of WORDS, so there is something to learn."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(n):
            k = i % len(labels)
            words = [WORDS[rng.randrange(20 * (k % 3), 20 * (k % 3) + 20)] if rng.random() < 0.7 else
                     rng.choice(WORDS) for _ in range(rng.randint(3, 20))]
            writer.writerow([" ".join(words), labels[k]])
    return str(path)


def tiny_checkpoint(folder, vocab_words=WORDS, weights=True):
    """The golden tiny BERT (vocab_size 99, dropout 0.1) with a WordPiece vocab.txt of our words."""
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(GOLDEN_BERT, "config.json"), folder)
    if weights:
        shutil.copy(os.path.join(GOLDEN_BERT, "model.safetensors"), folder)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(SPECIAL + list(vocab_words)) + "\n")
    return str(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    # 26 rows in batches of 4 = 7 batches: with 2 ranks the last step of an epoch is short; 7 val rows split unevenly
    return {"model": tiny_checkpoint(root / "model"), "train": write_texts(root / "train.csv", 26, 0),
            "val": write_texts(root / "val.csv", 7, 1), "root": root}


def job(tiny, out, *extra):
    return ["--model", tiny["model"], "--train-file", tiny["train"], "--val-file", tiny["val"], "--test-file", "",
            "--out-dir", str(out), "--max-length", "32", "--batch-size", "4", "--epochs", "2", "--eval-every", "2",
            "--log-every", "1", "--lr", "2e-3", "--keep-state", *extra]  # final weights compared: kept


def log_rows(out, kind):
    return [row for row in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if row["kind"] == kind]


def last_state(out):
    return torch.load(os.path.join(out, "last", "state.pt"), map_location="cpu", weights_only=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- several processes

NO_DROPOUT = ["--hidden-dropout", "0", "--attention-dropout", "0", "--classifier-dropout", "0"]


@pytest.fixture(scope="module")
def one_process(tiny):
    """The reference: one process whose step takes the 2 batches two ranks take."""
    out = tiny["root"] / "one_process"
    train.main(job(tiny, out, "--grad-accum", "2", *NO_DROPOUT))
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tiny, one_process, tmp_path, mode):
    """torchrun with 2 gloo processes: the same losses, evaluations (no row lost or doubled) and weights."""
    out = tmp_path / mode
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), "train.py", *job(tiny, out, *NO_DROPOUT)]
    command += ["--fsdp"] if mode == "fsdp" else []
    trackers = mode == "ddp" and all(importlib.util.find_spec(p) for p in ("tensorboard", "mlflow"))
    command += ["--report-to", "tensorboard,mlflow"] if trackers else []
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("step 8/8") == 1, "only rank 0 prints"
    if trackers:
        assert_only_rank_0_tracked(out)
    for kind in ("train", "eval"):
        ours, ref = log_rows(out, kind), log_rows(one_process, kind)
        assert [r["step"] for r in ours] == [r["step"] for r in ref] and len(ref) >= 4
        for a, b in zip(ours, ref):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
            assert a.get("accuracy") == b.get("accuracy")
    ours, ref = last_state(out)["model"], last_state(one_process)["model"]
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], atol=1e-5, rtol=1e-4)
    best = EncoderClassifier.from_pretrained(str(out), verbose=False)  # the HF folder rank 0 wrote
    assert best.config.id2label == {0: "c0", 1: "c1", 2: "c2"}


def assert_only_rank_0_tracked(out):
    """One TensorBoard event file and one MLflow run, each step once: rank 1 logged nothing."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert len(os.listdir(out / "tensorboard")) == 1
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in log_rows(out, "train")]
    client = MlflowClient(json.load(open(out / "mlflow_run.json"))["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("train.py").experiment_id])
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [r["step"] for r in log_rows(out, "train")]


def test_packed_batches_train_like_padded_ones(tiny, one_process, tmp_path):
    """--pack (the layout train.py uses on a GPU; on the CPU through the dense-mask fallback): the same
    losses, evaluations and weights as padded batches."""
    out = tmp_path / "packed"
    train.main(job(tiny, out, "--grad-accum", "2", "--pack", *NO_DROPOUT))
    for kind in ("train", "eval"):
        ours, ref = log_rows(out, kind), log_rows(one_process, kind)
        assert [r["step"] for r in ours] == [r["step"] for r in ref] and len(ref) >= 4
        for a, b in zip(ours, ref):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    ours, ref = last_state(out)["model"], last_state(one_process)["model"]
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def uninterrupted(tiny):
    """Dropout stays on (0.1): a resumed run must restore the random generators to match."""
    out = tiny["root"] / "uninterrupted"
    train.main(job(tiny, out))
    return out


def assert_same_run(out, ref):
    assert last_state(out)["step"] == last_state(ref)["step"] == 14
    ours, theirs = last_state(out)["model"], last_state(ref)["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), "final weights differ"
    ours, theirs = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(ref, "model.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), "best model differs"
    assert open(os.path.join(out, "metrics.jsonl")).read() == open(os.path.join(ref, "metrics.jsonl")).read()


def test_killed_run_resumes_to_the_same_weights(tiny, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    # slow steps so that the kill lands mid-training, just after the first last/ checkpoint
    slow = ("import sys, time, train\nstep = train.optimizer_step\n"
            "train.optimizer_step = lambda *a: (time.sleep(0.2), step(*a))[1]\ntrain.main(sys.argv[1:])")
    process = subprocess.Popen([sys.executable, "-c", slow, *job(tiny, out)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600  # generous for a loaded machine: the loop ends as soon as last/ exists
    while not os.path.exists(out / "last" / "state.pt") and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert last_state(out)["step"] < 14 and not (out / "report.txt").exists()

    train.main(job(tiny, out, "--resume"))
    assert_same_run(out, uninterrupted)


def test_failed_saves_keep_the_previous_checkpoints(tiny, uninterrupted, tmp_path, monkeypatch, capsys):
    """A save that dies midway (here: raises after writing half) leaves the previous last/state.pt and
    model.safetensors whole; temp debris is never taken for a checkpoint; --resume then finishes the run."""
    out = tmp_path / "failed"
    real_save, calls = torch.save, []

    def dying_save(obj, f, *args, **kwargs):  # the second training state dies mid-write
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a checkpoint")
            raise KeyboardInterrupt("killed while saving")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(SystemExit) as stop:
        train.main(job(tiny, out))
    assert stop.value.code == 130 and re.search(r"interrupted \(Ctrl-C\)\. Run the same command with --resume: it "
                                                r"continues from the last checkpoint, .*last/state.pt \(step 2\)",
                                                capsys.readouterr().err)
    monkeypatch.setattr(torch, "save", real_save)
    assert last_state(out)["step"] == 2 and os.listdir(out / "last") == ["state.pt"]

    real_write = EncoderClassifier.save_pretrained

    def dying_write(model, folder):  # the best model's new files die before they are moved in
        real_write(model, folder)
        with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
            f.truncate(100)
        raise KeyboardInterrupt("killed while saving")

    before = load_file(out / "model.safetensors")
    monkeypatch.setattr(EncoderClassifier, "save_pretrained", dying_write)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(EncoderClassifier.from_pretrained(str(out), verbose=False), str(out), tiny["model"],
                                    {})
    monkeypatch.setattr(EncoderClassifier, "save_pretrained", real_write)
    after = load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)

    (out / "last" / ".tmp-leftover").write_bytes(b"debris of a killed save")  # what SIGKILL would leave
    train.main(job(tiny, out, "--resume"))
    assert_same_run(out, uninterrupted)
    assert os.listdir(out / "last") == ["state.pt"]


def test_resume_refuses_other_options(tiny, uninterrupted, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    with pytest.raises(SystemExit, match=r"other options: --lr '?0.002'? \(now 0.001\); resume with the options of "
                                         r"the interrupted run \(--lr 0.002\)$"):
        train.main(job(tiny, out, "--resume", "--lr", "1e-3"))
    from side.checkpoints import as_flag  # what the message gives to type: a switch's own form, None as no option
    assert [as_flag("layer_mix", False), as_flag("prior_bias", True), as_flag("head_lr", None),
            as_flag("val_file", "")] == ["--no-layer-mix", "--prior-bias", "no --head-lr", "--val-file ''"]


# ----------------------------------------------------------------------------- non-finite steps

def poison_loss(monkeypatch, bad_calls):
    """Training losses number bad_calls (1-based; or all when None) become nan."""
    real, calls = EncoderClassifier.loss, []

    def loss(self, logits, labels):
        out = real(self, logits, labels)
        if not logits.requires_grad:  # evaluation
            return out
        calls.append(1)
        return out * float("nan") if bad_calls is None or len(calls) in bad_calls else out

    monkeypatch.setattr(EncoderClassifier, "loss", loss)


def test_non_finite_step_is_skipped_and_counted(tiny, tmp_path, monkeypatch):
    poison_loss(monkeypatch, {3})
    out = tmp_path / "nan"
    train.main(job(tiny, out, "--max-steps", "6", "--eval-every", "6"))
    rows = log_rows(out, "train")
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert all(r["loss"] == r["loss"] for r in rows), "a skipped step's nan stays out of the logged loss"
    state = last_state(out)
    assert all(torch.isfinite(w).all() for w in state["model"].values())
    assert state["optimizer"]["state"][0]["step"] == 5 and state["scheduler"]["last_epoch"] == 6


def test_non_finite_steps_in_a_row_stop_the_run(tiny, tmp_path, monkeypatch):
    poison_loss(monkeypatch, None)
    with pytest.raises(SystemExit, match=r"stopped at step 3: 3 optimizer steps in a row had a non-finite"):
        train.main(job(tiny, tmp_path / "nan", "--max-bad-steps", "3"))


# ----------------------------------------------------------------------------- clear errors

def test_out_of_memory_suggests_the_same_global_batch(tiny, tmp_path, monkeypatch):
    def forward(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(EncoderClassifier, "forward", forward)
    with pytest.raises(SystemExit, match=r"out of memory with --batch-size 4 --grad-accum 1 \(global batch 4\)\. "
                                         r"Try --batch-size 2 --grad-accum 2"):
        train.main(job(tiny, tmp_path / "oom"))


def test_checkpoint_without_weights(tiny, tmp_path):
    folder = tiny_checkpoint(tmp_path / "empty", weights=False)
    with pytest.raises(SystemExit, match=r"cannot use the checkpoint .*empty: no weights in"):
        train.main(job({**tiny, "model": folder}, tmp_path / "out"))
    with pytest.raises(SystemExit, match=r"cannot use the checkpoint .*empty: no weights in"):
        predict.main(["--model", folder, "--text", "w1 w2"])


def test_tokenizer_of_another_model(tiny, tmp_path):
    folder = tiny_checkpoint(tmp_path / "big_vocab", vocab_words=[f"w{i}" for i in range(115)])  # ids up to 119
    message = r"token ids up to 119 but the model's vocab_size is 99"
    with pytest.raises(SystemExit, match=message):
        train.main(job({**tiny, "model": folder}, tmp_path / "out"))
    with pytest.raises(SystemExit, match=message):
        predict.main(["--model", folder, "--text", "w1 w2"])


def test_predict_scores_a_labelled_file_and_refuses_unknown_labels(tiny, uninterrupted, tmp_path):
    good = write_texts(tmp_path / "good.csv", 6, 3)
    metrics = predict.main(["--model", str(uninterrupted), "--input", good, "--label-column", "label"])
    assert 0.0 <= metrics["accuracy"] <= 1.0
    bad = write_texts(tmp_path / "bad.csv", 6, 3, labels=("c0", "c9", "c2"))
    with pytest.raises(SystemExit, match=r"data error: .*bad.csv: 2 occurrence\(s\) of 1 label\(s\) not seen in "
                                         r"training: 'c9' \(rows 2, 5\)"):
        predict.main(["--model", str(uninterrupted), "--input", bad, "--label-column", "label"])
