"""Faults and bad input in training (issue #27): a full disk, Ctrl-C, options that were silently ignored,
masked-LM with nothing to score, labels no training row teaches, and misleading messages. Each case ends with one
message saying what happened and how to go on, and leaves the previous checkpoint whole."""
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import predict
import train
from data import DataError
from model import MaskedLM
from side import logs
from test_mlm import mlm_job, tiny_mlm_checkpoint
from test_robustness import (ROOT, assert_same_run, job, last_state, tiny, tiny_checkpoint,  # noqa: F401 (fixtures)
                             uninterrupted, write_texts)

FULL = os.strerror(errno.ENOSPC)  # "No space left on device"


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Unlabelled notes (one per line) for --task mlm, and a labelled test file."""
    root = tmp_path_factory.mktemp("faults")
    rows = open(write_texts(root / "labelled.csv", 30, 0)).read().splitlines()[1:]
    (root / "notes.txt").write_text("\n".join(row.rsplit(",", 1)[0] for row in rows) + "\n")
    return {"train": str(root / "notes.txt"), "test": write_texts(root / "test.csv", 8, 1), "root": root,
            "labelled": str(root / "labelled.csv"), "classifier": tiny_checkpoint(root / "classifier")}


FAST = ["--max-length", "32", "--batch-size", "4", "--log-every", "1", "--lr", "2e-3"]


# ----------------------------------------------------------------------------- 1: a full disk

@pytest.fixture
def small_disk(tmp_path):
    """mount(size): a folder on a tmpfs of that size (root only: skipped where mount is not permitted);
    grow(folder): room again, as after freeing space. Unmounted afterwards."""
    mounted = []

    def mount(size):
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode or os.geteuid() != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        mounted.append(folder)
        return folder

    mount.grow = lambda folder: subprocess.run(["mount", "-o", "remount,size=20m", str(folder)], check=True)
    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_full_disk_before_the_first_checkpoint(tiny, small_disk):
    """The issue's case: --out-dir on a 200 KB tmpfs. The first training state (about 300 KB) does not fit."""
    out = small_disk("200k") / "out"
    with pytest.raises(SystemExit, match=rf"^cannot write the training state {out}/last/state.pt: {FULL}\. Once "
                                         r"there is space, run the same command with --overwrite: there is no "
                                         r"checkpoint to resume from yet$"):
        train.main(job(tiny, out))
    assert not [name for name in os.listdir(out / "last") if name.startswith(".tmp-")], "no debris left"


def test_full_disk_mid_run_keeps_the_checkpoint_and_resumes(tiny, uninterrupted, small_disk):
    """600 KB holds the first checkpoint (model 85 KB, state 300 KB) but not the next one beside it. After
    space is freed, --resume ends with the weights of a run that never stopped."""
    disk = small_disk("600k")
    out = disk / "out"
    with pytest.raises(SystemExit, match=rf"^cannot write the (training state {out}/last/state.pt|model to {out}): "
                                         rf"{FULL}\. Once there is space, run the same command with --resume: it "
                                         rf"continues from the last checkpoint, {out}/last/state.pt \(step 2\)$"):
        train.main(job(tiny, out))
    assert last_state(out)["step"] == 2
    small_disk.grow(disk)
    train.main(job(tiny, out, "--resume"))
    assert_same_run(out, uninterrupted)


def saves_until_full(real_save, calls):
    """torch.save, failing from its calls-th call on as it does on a full disk: part of the file written, then a
    RuntimeError about stream positions whose context is the OSError."""
    count = []

    def save(obj, f, *args, **kwargs):
        count.append(1)
        if len(count) < calls:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"part of a checkpoint")
        try:
            raise OSError(errno.ENOSPC, FULL)
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    return save


class FullLog:
    """metrics.jsonl's file, whose writes fail once `rows` rows are written."""

    def __init__(self, file, rows):
        self.file, self.rows = file, rows

    def write(self, text):
        self.rows -= 1
        if self.rows < 0:
            raise OSError(errno.ENOSPC, FULL)
        return self.file.write(text)

    def __getattr__(self, name):
        return getattr(self.file, name)


@pytest.mark.parametrize("what", ["state", "log", "report"])
def test_failed_write_names_the_path_and_resumes(tiny, uninterrupted, tmp_path, monkeypatch, what):
    """The portable variant: a write that raises ENOSPC (the training state's second save, the log's fifth row,
    the report); the message names the path and --resume, and --resume ends as the uninterrupted run."""
    out = tmp_path / "out"
    if what == "state":
        monkeypatch.setattr(torch, "save", saves_until_full(torch.save, 2))
        failed, step = rf"the training state {out}/last/state.pt", 2
    elif what == "log":
        real_init = logs.TrainLog.__init__

        def init(self, *args):
            real_init(self, *args)
            self.file = FullLog(self.file, 5)
        monkeypatch.setattr(logs.TrainLog, "__init__", init)
        failed, step = rf"the log {out}/metrics.jsonl", 2
    else:
        monkeypatch.setattr(train, "final_report", lambda *a: open(os.path.join(out, "..", "missing", "r"), "w"))
        failed, step = rf"the report to {out}", 14
    with pytest.raises(SystemExit, match=rf"^cannot write {failed}: .*\. Once .*, run the same command with "
                                         rf"--resume: it continues from the last checkpoint, .*\(step {step}\)$"):
        train.main(job(tiny, out))
    monkeypatch.undo()
    train.main(job(tiny, out, "--resume"))
    assert_same_run(out, uninterrupted)


# ----------------------------------------------------------------------------- 2: Ctrl-C

def test_ctrl_c_names_the_last_checkpoint_and_resumes(tiny, uninterrupted, tmp_path):
    """SIGINT to a real training process (SIGINT at its default: a background process of a non-interactive shell
    would ignore it), once its first checkpoint is written; then --resume ends as the uninterrupted run."""
    out = tmp_path / "interrupted"
    slow = ("import sys, time, train\nstep = train.optimizer_step\n"
            "train.optimizer_step = lambda *a: (time.sleep(0.2), step(*a))[1]\ntrain.main(sys.argv[1:])")
    process = subprocess.Popen([sys.executable, "-c", slow, *job(tiny, out)], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 600
    while not os.path.exists(out / "last" / "state.pt") and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=600)[1]
    step = last_state(out)["step"]
    assert process.returncode == 128 + signal.SIGINT and step < 14, stderr
    assert "Traceback" not in stderr and stderr.strip() == (
        f"interrupted (Ctrl-C). Run the same command with --resume: it continues from the last checkpoint, "
        f"{out}/last/state.pt (step {step})"), stderr
    train.main(job(tiny, out, "--resume"))
    assert_same_run(out, uninterrupted)


# ----------------------------------------------------------------------------- 3: a smaller masked LM

@pytest.fixture(scope="module")
def small_mlm(texts):
    """A masked LM of 1 of the tiny BERT's 2 layers, trained 2 steps with --num-layers 1."""
    model = tiny_mlm_checkpoint(texts["root"] / "mlm_model", "bert")
    out = texts["root"] / "small_mlm"
    train.main(mlm_job(model, texts, out, "--num-layers", "1", "--max-steps", "2", "--eval-every", "2"))
    return {"model": model, "out": out}


def test_mlm_keeps_the_layers_num_layers_asks_for(tmp_path, texts, small_mlm):
    """The tiny BERT has 2 layers: --num-layers 1 trains and saves a masked LM of 1 (it was silently all)."""
    model, out = small_mlm["model"], small_mlm["out"]
    assert json.load(open(out / "train_config.json"))["num_layers"] == 1
    assert json.load(open(out / "config.json"))["num_hidden_layers"] == 1
    assert len(MaskedLM.from_pretrained(out, verbose=False).encoder.layers) == 1
    with pytest.raises(SystemExit, match=r"--num-layers 3: the checkpoint has only 2 layers"):
        train.main(mlm_job(model, texts, tmp_path / "too_many", "--num-layers", "3"))


# ----------------------------------------------------------------------------- 5: a config file naming another

def test_config_key_inside_a_config_file_is_an_error(tmp_path):
    inner = write(tmp_path / "inner.toml", "lr = 1e-3\n")
    outer = write(tmp_path / "outer.toml", f'config = "{inner}"\nepochs = 2\n')
    with pytest.raises(SystemExit, match=r"--config .*outer.toml: config = '.*inner.toml': a config file cannot "
                                         r"name another; merge its options into this one"):
        train.parse_config(["--config", outer])


# ----------------------------------------------------------------------------- 4: masked-LM with nothing to score

@pytest.mark.parametrize("case", ["rate", "val", "test"])
def test_mlm_refuses_evaluation_data_without_a_masked_token(tmp_path, texts, case, monkeypatch):
    """It reported validation loss 0.0000, perplexity 1.00, and picked a "best" checkpoint from that. Two texts of
    one word each: at 0.15, seed 0 masks neither."""
    monkeypatch.setattr(MaskedLM, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    model = tiny_mlm_checkpoint(tmp_path / "model", "bert")
    two_words = write(tmp_path / "two.txt", "w1\nw2\n")
    extra = {"rate": ["--mlm-probability", "0.001"], "val": ["--val-file", two_words],
             "test": ["--test-file", two_words]}[case]
    split, tokens = ("validation", r"\d+") if case == "rate" else ("test" if case == "test" else "validation", "6")
    with pytest.raises(SystemExit, match=rf"--mlm-probability [\d.]+ masks none of the {tokens} tokens of the \d+ "
                                         rf"{split} sequence\(s\): there is nothing to score\. Raise --mlm-prob"):
        train.main(mlm_job(model, texts, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 6: labels only in validation

def test_multi_label_split_warns_of_labels_no_training_row_has(tmp_path, texts, capsys):
    """30 labels of one row each: the 20% validation share holds 6 of them, which no training row has."""
    rows = open(texts["labelled"]).read().splitlines()[1:]
    data = write(tmp_path / "rare.csv", "text,labels\n" + "".join(f"{row.rsplit(',', 1)[0]},l{i};common\n"
                                                                 for i, row in enumerate(rows)))
    out = tmp_path / "out"
    train.main(["--model", texts["classifier"], "--train-file", data, "--test-file", "", "--task", "multi",
                "--val-fraction", "0.2", "--out-dir", str(out), "--max-steps", "1", *FAST])
    printed = capsys.readouterr().out
    assert re.search(r"warning: .*rare.csv: 6 of 31 labels occur only in the --val-fraction 0.2 validation share, "
                     r"in no training row: the model cannot learn them.*\('l\d+' \(1 row\), ", printed), printed
    assert (out / "model.safetensors").exists()  # a warning: the run goes on


# ----------------------------------------------------------------------------- 8: misleading messages (training)

def test_jsonl_text_that_is_a_number_is_named_so(tiny, tmp_path):
    data = write(tmp_path / "numbers.jsonl", '{"text": "w1 w2", "label": "c0"}\n{"text": 42, "label": "c1"}\n')
    with pytest.raises(SystemExit, match=r"^data error: .*numbers.jsonl: row 2 \(line 2\): the text in column 'text' "
                                         r"is a number \(42\), not a string: write it in quotes$"):
        train.main(job(tiny, tmp_path / "out", "--train-file", data))
    assert not (tmp_path / "out").exists()


def test_masked_lm_folder_as_teacher_is_named_so(tiny, small_mlm, tmp_path):
    """It listed the MLM folder's labels as "single-label, 0: "."""
    with pytest.raises(SystemExit, match=rf"^--teacher {small_mlm['out']}: not a fine-tuned classifier "
                                         r"\(BertForMaskedLM, no labels in its config.json\): fine-tune it on this "
                                         r"data first \(train.py --model it\), then distil from that folder$"):
        train.main(job(tiny, tmp_path / "out", "--teacher", str(small_mlm["out"])))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 9: empty and invisible texts

@pytest.mark.parametrize("blank", ["", "  ", "\u00a0", "\u200b", "\u200b\u00a0\ufeff\u00ad\u2060"])
def test_one_rule_for_empty_and_invisible_training_texts(tiny, tmp_path, blank):
    """A row of only U+200B was accepted while one of U+00A0 was refused: both are refused now."""
    data = write(tmp_path / "blank.csv", f"text,label\nw1 w2,c0\n{blank},c1\n")
    with pytest.raises(SystemExit, match=r"^data error: .*blank.csv: row 2 \(line 3\): empty text in column 'text' "
                                         r"\(nothing, or only spaces and invisible characters\)$"):
        train.main(job(tiny, tmp_path / "out", "--train-file", data))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- 7, 8, 9: predict.py

def test_pair_model_without_its_second_text_warns(tiny, tmp_path, capsys):
    """train_config.json records the pair column: predict.py and the Predictor API say when it is not given."""
    rows = open(tiny["train"]).read().splitlines()[1:]
    pairs = write(tmp_path / "pairs.csv", "text,hypothesis,label\n" + "".join(
        f"{row.rsplit(',', 1)[0]},w{i % 7} w{i % 5},{row.rsplit(',', 1)[1]}\n" for i, row in enumerate(rows)))
    out = tmp_path / "pairs"
    train.main(job(tiny, out, "--train-file", pairs, "--val-file", "", "--text-pair-column", "hypothesis",
                   "--max-steps", "2"))
    capsys.readouterr()
    warning = (rf"warning: {out} was trained on sentence pairs \(--text-pair-column hypothesis\); these texts come "
               r"without their second text: pass --text-pair-column \(Predictor: pairs=\)")
    predict.main(["--model", str(out), "--text", "w1 w2"])
    assert re.search(warning, capsys.readouterr().err)
    predict.Predictor(str(out)).predict(["w1 w2"])
    assert re.search(warning, capsys.readouterr().err)
    predict.main(["--model", str(out), "--input", pairs, "--text-pair-column", "hypothesis"])
    assert "warning" not in capsys.readouterr().err


def test_bad_window_stride_in_predict_is_not_blamed_on_the_checkpoint(uninterrupted):
    with pytest.raises(SystemExit, match=r"^window stride 999 must be between 1 and 30 \(the text tokens of a window "
                                         r"of max_length 32: a larger stride would skip tokens\)$"):
        predict.main(["--model", str(uninterrupted), "--long-docs", "windows_mean", "--window-stride", "999",
                      "--text", "w1 w2"])


@pytest.mark.parametrize("blank", ["", " ", "\u00a0", "\u200b", "\ufeff\u200d"])
def test_python_api_refuses_empty_and_invisible_texts_as_the_cli_does(uninterrupted, blank):
    predictor = predict.Predictor(str(uninterrupted))
    message = r"^text 2 \(of 3\): empty, or only spaces and invisible characters; there is nothing to read$"
    for call in (predictor.predict, predictor.embeddings):
        with pytest.raises(DataError, match=message):
            call(["w1 w2", blank, "w3"])
    with pytest.raises(SystemExit, match=r"^--text number 2 is empty \(or only spaces and invisible characters\)"):
        predict.main(["--model", str(uninterrupted), "--text", "w1", "--text", blank])
