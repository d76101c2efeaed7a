"""side/files.py, the one writer (issue 35): whole files replaced only once whole, one error naming the file, the
collision guard, and the lock a running run holds. Milliseconds each: no model."""
import contextlib
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import predict
import side.explain
import train
import side.output
from side import files
from test_predict_stream import write_notes
from test_robustness import ROOT, tiny_checkpoint, write_texts


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "table.md"
    path.write_text("old\n")
    with pytest.raises(files.WriteFailed, match=rf"^cannot write the table {path}: No space left on device$"):
        with files.replacing(str(path), "the table") as tmp:
            open(tmp, "w").write("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["table.md"]
    with pytest.raises(KeyboardInterrupt):
        with files.replacing(str(path)) as tmp:
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["table.md"]
    (tmp_path / ".tmp-table.md").write_text("what a kill -9 mid-write left")
    files.write_json(str(path), {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n' and os.listdir(tmp_path) == ["table.md"]


def test_a_new_file_keeps_the_old_ones_mode(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{}")
    os.chmod(path, 0o640)
    files.write_text(str(path), "{}\n")
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(files.WriteFailed, match=r"cannot write .*/nowhere/x.txt: No such file or directory"):
        files.write_text(str(tmp_path / "nowhere" / "x.txt"), "x")


def test_appender_keeps_whole_records(tmp_path):
    path = str(tmp_path / "out.partial")
    log = files.Appender(path, start_bytes=4)
    log.write(b"abc")
    log.write("dé")
    log.write_at(0, b"HEAD")
    log.close()
    assert open(path, "rb").read() == "HEADabcdé".encode()
    resumed = files.Appender(path, start=7)  # what a killed write left after byte 7 goes
    resumed.write(b"!")
    resumed.close()
    assert open(path, "rb").read() == b"HEADabc!"


def test_collisions(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "vocab.txt").write_text("x")
    notes = tmp_path / "notes.csv"
    notes.write_text("text\nx\n")
    os.symlink(notes, tmp_path / "link.csv")
    reads = {"--input file": str(notes), "--model folder": str(model)}
    assert files.collisions({"--output": str(tmp_path / "o.csv")}, reads) is None
    for output, problem in [(str(notes), "is the --input file"), (str(tmp_path / "link.csv"), "is the --input file"),
                            (f"{tmp_path}/model/../notes.csv", "is the --input file"),
                            (str(model / "vocab.txt"), "lies inside the --model folder"),
                            (str(model / "new.csv"), "lies inside the --model folder"),
                            ("-", "name a file"), (str(tmp_path), "is a folder")]:
        message = files.collisions({"--output": output}, reads)
        assert message and problem in message, (output, message)
    os.link(notes, tmp_path / "hard.csv")
    assert "is the --input file" in files.collisions({"--output": str(tmp_path / "hard.csv")}, reads)
    twice = files.collisions({"--output": str(tmp_path / "a.csv"), "--explain-html": str(tmp_path / "a.csv")}, {})
    assert twice == f"--explain-html {tmp_path}/a.csv is also --output: one file cannot be both; name another file"


def test_a_second_holder_is_refused_by_name_until_the_first_ends(tmp_path):
    lock = str(tmp_path / "out.lock")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from side import files; "
                               f"h = files.hold({lock!r}, 'x'); print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(files.Busy, match=rf"^--output o.csv is in use by a run that has not ended \(pid "
                                             rf"{holder.pid}: -c\)"):
            files.hold(lock, "--output o.csv")
    finally:
        holder.kill()  # kill -9: the OS lets go of its lock
        holder.wait()
    handle = files.hold(lock, "--output o.csv")
    files.release(handle)
    assert not os.path.exists(lock)


# ----------------------------------------------------------------------------- issue 35's cases, through predict.py

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    return {"model": tiny_checkpoint(root / "model"), "root": root}


def run(*args):
    """(exit status, stdout, stderr) of predict.py in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            predict.main([str(a) for a in args])
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) or stop.code is None else stop.code
    return code, out.getvalue(), err.getvalue()


def refused(*args):
    """The one-line message predict.py ends with (an assertion that it ends with one)."""
    code, _, _ = run(*args)
    assert isinstance(code, str), f"not refused: status {code}"
    return code


def snapshot(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


def test_01_an_input_named_like_the_rejects_file_is_kept(tiny, tmp_path):
    notes = tmp_path / "z.rejects.jsonl"
    notes.write_text("".join(json.dumps({"id": i, "text": f"w{i} w2"}) + "\n" for i in range(4)))
    before = snapshot(tmp_path)
    message = refused("--model", tiny["model"], "--input", notes, "--output", tmp_path / "z.csv")
    assert f"--output {tmp_path}/z.csv's rejects file {tmp_path}/z.rejects.jsonl is the --input file" in message
    assert snapshot(tmp_path) == before


def test_02_the_page_onto_the_input_or_the_output_is_refused(tiny, tmp_path):
    notes = write_notes(tmp_path / "notes.csv", 4)
    before = snapshot(tmp_path)
    for page, problem in [(notes, "is the --input file"), (tmp_path / "o.csv", "is also --output")]:
        message = refused("--model", tiny["model"], "--input", notes, "--output", tmp_path / "o.csv",
                          "--explain-html", page)
        assert f"--explain-html {page} {problem}" in message
    assert snapshot(tmp_path) == before


def test_03_output_into_the_model_folder_is_refused(tiny, tmp_path):
    notes = write_notes(tmp_path / "notes.csv", 4)
    before = snapshot(tiny["model"])
    for name in ("vocab.txt", "metrics.jsonl", "new.csv"):
        message = refused("--model", tiny["model"], "--input", notes, "--output", f"{tiny['model']}/{name}")
        assert f"lies inside the --model folder {tiny['model']}" in message
    link = tmp_path / "link"
    os.symlink(tiny["model"], link)
    assert "lies inside the --model folder" in refused("--model", tiny["model"], "--input", notes, "--output",
                                                      link / "config.jsonl")
    assert snapshot(tiny["model"]) == before


def test_04_more_shards_than_chunks(tiny, tmp_path):
    notes = write_notes(tmp_path / "notes.csv", 3)
    job = ["--model", tiny["model"], "--input", notes, "--chunk-rows", 10]
    assert run(*job, "--output", tmp_path / "whole.csv")[0] == 0
    for k in (0, 1):
        code, _, err = run(*job, "--output", tmp_path / f"part{k}.csv", "--shard", f"{k}/2")
        assert code == 0 and "Traceback" not in err
    assert (tmp_path / "part0.csv").read_bytes() == b""  # shard 0 has no chunk: an empty part, no state left
    assert (tmp_path / "part1.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert not [name for name in os.listdir(tmp_path) if name.endswith((".resume.json", ".partial", ".lock"))]


@pytest.fixture(scope="module")
def uninterrupted(tiny):
    """9 rows labelled in chunks of 2 without a stop: their input file and output bytes, by output name."""
    notes = write_notes(tiny["root"] / "nine.csv", 9)
    job = ["--model", tiny["model"], "--input", notes, "--chunk-rows", 2]
    whole = {}
    for flag, name in (("--output", "o.csv"), ("--embeddings", "v.npy")):
        assert run(*job, flag, tiny["root"] / name)[0] == 0
        whole[name] = (tiny["root"] / name).read_bytes()
    return job, whole


def interrupted(uninterrupted, tmp_path, monkeypatch, chunks=2, flag="--output", name="o.csv"):
    """The 9 rows' run stopped after `chunks` chunks (its state and partials left), and the uninterrupted run's
    bytes."""
    job, whole = uninterrupted
    commit = side.output.ChunkWriter.commit

    def stop_after(self, *args):
        if self.chunks == chunks:
            raise KeyboardInterrupt
        commit(self, *args)
    monkeypatch.setattr(side.output.ChunkWriter, "commit", stop_after)
    with pytest.raises(SystemExit, match="^130$"):  # Ctrl-C: one message (side/signals.py), status 130
        predict.main([str(a) for a in job] + [flag, str(tmp_path / name)])
    monkeypatch.undo()
    return job + [flag, tmp_path / name], whole[name]


def follow(message, job):
    """Run the command the message advises: `rm -f ...` (in backticks), then the same command without --resume."""
    advised = re.search(r"`(rm -f [^`]+)`", message).group(1)
    assert subprocess.run(advised, shell=True).returncode == 0
    return run(*[a for a in job if a != "--resume"])[0]


@pytest.mark.parametrize("damage", ["empty", "truncated", "not an object", "wrong types", "partial missing",
                                    "partial shorter", "partial changed", "partial longer"])
def test_06_resume_checks_what_it_resumes(uninterrupted, tmp_path, monkeypatch, damage):
    job, whole = interrupted(uninterrupted, tmp_path, monkeypatch)
    state, partial = tmp_path / "o.csv.resume.json", tmp_path / "o.csv.partial"
    text, size = state.read_text(), partial.stat().st_size
    if damage == "empty":
        state.write_text("")
    elif damage == "truncated":
        state.write_text(text[:len(text) // 2])
    elif damage == "not an object":
        state.write_text("[1, 2]")
    elif damage == "wrong types":
        state.write_text(text.replace('"sizes": [', '"sizes": ["x", '))
    elif damage == "partial missing":
        partial.unlink()
    elif damage == "partial shorter":
        os.truncate(partial, size - 1)
    elif damage == "partial changed":
        partial.write_bytes(b"X" + partial.read_bytes()[1:])
    else:  # bytes after the recorded ones: what a kill mid-chunk leaves; cut off, the run resumes to the same bytes
        with open(partial, "ab") as f:
            f.write(b"half a chunk")
        assert run(*job, "--resume")[0] == 0 and (tmp_path / "o.csv").read_bytes() == whole
        return
    named = {"partial missing": f"{partial} is missing", "partial shorter": f"{partial} holds {size - 1} bytes",
             "partial changed": f"{partial}'s first {size} bytes are not those the run wrote"}.get(
        damage, f"{state} is")
    for resume in ([], ["--resume"]):
        message = refused(*job, *resume)
        assert message.startswith(f"cannot continue the interrupted run of {tmp_path}/o.csv: {named}"), message
        assert message.endswith("then run the same command without --resume")
    assert follow(message, job) == 0 and (tmp_path / "o.csv").read_bytes() == whole


def test_06_a_kill_after_the_npy_header_was_written_resumes(uninterrupted, tmp_path, monkeypatch):
    """The header is written into its reserved room last: the checksums leave that room out, so a kill after it
    still resumes (to the uninterrupted run's bytes)."""
    job, whole = interrupted(uninterrupted, tmp_path, monkeypatch, flag="--embeddings", name="v.npy")
    with open(tmp_path / "v.npy.partial", "r+b") as f:
        f.write(whole[:side.output.NPY_HEADER_BYTES])
    assert run(*job, "--resume")[0] == 0 and (tmp_path / "v.npy").read_bytes() == whole


@pytest.mark.parametrize("advice", ["resume", "start over"])
def test_06_an_intact_state_advises_two_commands_and_both_work(uninterrupted, tmp_path, monkeypatch, advice):
    job, whole = interrupted(uninterrupted, tmp_path, monkeypatch)
    message = refused(*job)
    assert "run the same command with --resume to continue it, or `rm -f " in message
    code = run(*job, "--resume")[0] if advice == "resume" else follow(message, job)
    assert code == 0 and (tmp_path / "o.csv").read_bytes() == whole


def test_06_a_resume_with_other_options_advises_a_command_that_works(uninterrupted, tmp_path, monkeypatch):
    job, whole = interrupted(uninterrupted, tmp_path, monkeypatch)
    command = [*job, "--resume", "--batch-size", "3"]
    message = refused(*command)
    assert message.startswith(f"cannot --resume {tmp_path}/o.csv: --batch-size (64 then, 3 now) changed")
    assert follow(message, command) == 0 and len((tmp_path / "o.csv").read_text().splitlines()) == len(
        whole.decode().splitlines())


def test_07_a_config_that_is_not_an_object_is_named(tiny, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny["model"], broken)
    notes = write_notes(tmp_path / "notes.csv", 2)
    for text, problem in [("[1, 2]", "is not a JSON object of settings (it holds a list)"),
                          ('{"model_type": ', "is not valid JSON")]:
        (broken / "config.json").write_text(text)
        message = refused("--model", broken, "--input", notes)
        assert message.startswith(f"cannot use the checkpoint {broken}: {broken}/config.json {problem}"), message
        with pytest.raises(ValueError, match=f"{broken}/config.json {re.escape(problem)}"):
            predict.Predictor(str(broken))


def test_10_output_names_stdout_and_formats(tiny, tmp_path):
    notes = write_notes(tmp_path / "notes.csv", 3)
    for name in ("x.csv.gz", "x.parquet", "x.txt", "x"):
        message = refused("--model", tiny["model"], "--input", notes, "--output", tmp_path / name)
        assert "write .csv, .tsv or .jsonl (the format follows the name" in message
    code, stdout, _ = run("--model", tiny["model"], "--input", notes, "--output", "-")
    assert code == 0 and len(stdout.splitlines()) == 3 and not os.path.exists("-")
    assert run("--model", tiny["model"], "--input", notes, "--output", tmp_path / "UPPER.CSV")[0] == 0
    assert (tmp_path / "UPPER.CSV").read_text().startswith("note_id,site,input_label,label,probability\n")


def test_11_label_column_with_output_is_refused(tiny, tmp_path, capsys):
    notes = write_notes(tmp_path / "notes.csv", 3)
    with pytest.raises(SystemExit):
        predict.main(["--model", tiny["model"], "--input", notes, "--label-column", "label", "--output",
                      str(tmp_path / "o.csv")])
    assert "--label-column prints the metrics as JSON instead of writing predictions" in capsys.readouterr().err


def test_12_columns_named_like_renamed_ones_keep_their_values(tiny, tmp_path):
    notes = tmp_path / "notes.csv"
    notes.write_text("note_id,label,probability,input_label,text\nn1,L,0.5,IL,w1 w2\n")
    assert run("--model", tiny["model"], "--input", notes, "--output", tmp_path / "o.jsonl")[0] == 0
    row = json.loads((tmp_path / "o.jsonl").read_text())
    assert (row["note_id"], row["input_label"], row["input_probability"], row["input_input_label"]) == (
        "n1", "L", "0.5", "IL")
    assert run("--model", tiny["model"], "--input", notes, "--output", tmp_path / "o.csv")[0] == 0
    header = (tmp_path / "o.csv").read_text().splitlines()[0].split(",")
    assert header == ["note_id", "input_label", "input_probability", "input_input_label", "label", "probability"]


def test_13_blank_lines_of_a_txt_file_keep_row_i_on_line_i(tiny, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("w1 w2\n\nw3\n   \nw4 w5\n")
    code, stdout, err = run("--model", tiny["model"], "--input", notes, "--output", tmp_path / "o.jsonl")
    assert code == predict.REJECTED_EXIT
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 3
    rejects = [json.loads(line) for line in open(tmp_path / "o.rejects.jsonl")]
    assert [(r["row"], r["line"]) for r in rejects] == [(2, 2), (4, 4)]


def test_16_the_page_is_checked_first_and_written_after_the_predictions(tiny, tmp_path, monkeypatch):
    notes = write_notes(tmp_path / "notes.csv", 3)
    job = ["--model", tiny["model"], "--input", notes, "--output", tmp_path / "o.csv"]
    (tmp_path / "folder.html").mkdir()
    for page, problem in [(tmp_path / "missing" / "p.html", "does not exist"), (tmp_path / "folder.html", "folder")]:
        assert problem in refused(*job, "--explain-html", page)
    assert not (tmp_path / "o.csv").exists()

    def full_disk(path, *args):
        raise files.WriteFailed("", path, "No space left on device")
    monkeypatch.setattr(side.explain, "write_page", full_disk)
    message = refused(*job, "--explain-html", tmp_path / "p.html")
    assert message == (f"cannot write {tmp_path}/p.html: No space left on device; the predictions are complete in "
                       f"{tmp_path}/o.csv: once that is fixed, run the same command again for the page (it labels "
                       "the texts again)")
    predictions = (tmp_path / "o.csv").read_bytes()
    monkeypatch.undo()
    assert run(*job, "--explain-html", tmp_path / "p.html")[0] == 0
    assert (tmp_path / "p.html").exists() and (tmp_path / "o.csv").read_bytes() == predictions


def test_a_second_run_on_the_same_output_is_refused(tiny, tmp_path):
    notes = write_notes(tmp_path / "notes.csv", 3)
    holder = subprocess.Popen([sys.executable, "-c", "import time; from side import files; "
                               f"h = files.hold({str(tmp_path / 'o.csv.lock')!r}, 'x'); print('held', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        message = refused("--model", tiny["model"], "--input", notes, "--output", tmp_path / "o.csv")
        assert message.startswith(f"--output {tmp_path}/o.csv is in use by a run that has not ended (pid "
                                  f"{holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert run("--model", tiny["model"], "--input", notes, "--output", tmp_path / "o.csv")[0] == 0
    assert not (tmp_path / "o.csv.lock").exists()


# ----------------------------------------------------------------------------- the Python API checks like the CLI

def test_09_15_17_the_api_checks_its_arguments_as_the_command_line(tiny):
    p = predict.Predictor(tiny["model"])
    texts = ["w1 w2", "w3", "w4", "w5", "w6"]
    for call, error, message in [
            (lambda: p.stream(texts, chunk_rows=-1), ValueError, "chunk_rows=-1 must be >= 1"),
            (lambda: p.stream(texts, chunk_rows=0), ValueError, "chunk_rows=0 must be >= 1"),
            (lambda: p.stream(texts, chunk_rows=2.5), TypeError, "chunk_rows=2.5 must be an integer >= 1"),
            (lambda: p.stream("abc"), TypeError, "not one string (each character would be labelled)"),
            (lambda: p.stream({"text": "w1"}), TypeError, "not one row"),
            (lambda: p.stream(None), TypeError, "not None"),
            (lambda: p.predict("abc"), TypeError, "not one string"),
            (lambda: p.predict(None), TypeError, "not None"),
            (lambda: p.embeddings("abc"), TypeError, "not one string"),
            (lambda: p.explain(texts, top=0), ValueError, "top=0 must be >= 1"),
            (lambda: p.explain("abc"), TypeError, "not one string"),
            (lambda: predict.Predictor(tiny["model"], batch_size=0), ValueError, "batch_size=0 must be >= 1")]:
        with pytest.raises(error, match=re.escape(message)):
            call()
    blank = texts[:4] + [" "] + texts[4:]
    with pytest.raises(ValueError, match=r"^text 5: empty"):  # its place in the whole stream, not in its chunk
        list(p.stream(blank, chunk_rows=2))
    with pytest.raises(ValueError, match=r"^text 5 \(of 6\): empty"):
        p.predict(blank)
    assert p.predict([]) == [] and list(p.stream([])) == []
    assert [x["label"] for x in p.stream(texts, chunk_rows=2)] == [x["label"] for x in p.predict(texts)]


# ----------------------------------------------------------------------------- train.py: its out-dir

def train_job(tiny, out, *extra, train_file=None):
    data = tiny.setdefault("data", write_texts(tiny["root"] / "train.csv", 12, 0))
    return ["--model", tiny["model"], "--train-file", train_file or data, "--val-file", data, "--test-file", "",
            "--out-dir", str(out), "--max-steps", "1", "--max-length", "16", "--batch-size", "4", *extra]


def test_train_refuses_outputs_onto_what_it_reads(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(train.EncoderClassifier, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "out"
    (out / "last").mkdir(parents=True)
    config = out / "train_config.json"
    config.write_text('{"epochs": 1}')
    data = shutil.copy(write_texts(tmp_path / "t.csv", 12, 0), str(out / "last" / "rows.csv"))
    before = snapshot(out)
    with pytest.raises(SystemExit, match=rf"--out-dir {out}'s train_config.json {out}/train_config.json is the "
                                         rf"--config file {config}: the run would replace it; pass another --out-dir"):
        train.main(train_job(tiny, out, "--config", str(config), "--overwrite"))
    with pytest.raises(SystemExit, match=rf"--out-dir {out}'s last {out}/last holds the --train-file {data}"):
        train.main(train_job(tiny, out, "--overwrite", train_file=data))
    assert snapshot(out) == before and snapshot(out / "last") == {"rows.csv": open(data, "rb").read()}


def test_a_second_train_on_the_same_out_dir_is_refused(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(train.EncoderClassifier, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; from side import options; "
                               f"h = options.hold_out_dir({str(out)!r}); print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SystemExit, match=rf"^--out-dir {out} is in use by a run that has not ended \(pid "
                                             rf"{holder.pid}: -c\)"):
            train.main(train_job(tiny, out))
    finally:
        holder.kill()  # kill -9: its lock goes with it
        holder.wait()
    monkeypatch.undo()
    train.main(train_job(tiny, out))
    assert (out / "model.safetensors").exists() and not (out / ".lock").exists()


def test_collisions_say_each_file_read_once(tmp_path):
    """An output inside the model folder is one line, not one more for each file beside it (rejects, lock)."""
    model = tmp_path / "model"
    model.mkdir()
    out = str(model / "o.csv")
    message = files.collisions({"--output": out, "its rejects": out + ".rejects", "its lock": out + ".lock"},
                               {"--model folder": str(model)})
    assert message.count("lies inside the --model folder") == 1 and message.startswith(f"--output {out} lies")


def test_writers_of_one_file_keep_to_their_own_temps_and_clear_dead_ones(tmp_path):
    """Several processes (a sweep's) writing one table at once: none fails on another's temp, each write is whole;
    a killed writer's temp is cleared by the next write, a live one's (another file's too) left alone."""
    import subprocess
    import sys
    import threading
    path, errors = tmp_path / "trials.md", []

    def write(k):
        try:
            for i in range(150):
                files.write_text(str(path), f"writer {k}, write {i}\n" * 50)
        except Exception as e:  # noqa: BLE001 - any failure fails the test below
            errors.append(e)
    writers = [threading.Thread(target=write, args=(k,)) for k in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert not errors, errors[0]
    assert len(set(path.read_text().splitlines())) == 1 and len(path.read_text().splitlines()) == 50

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftovers = [f".tmp-trials.md.{dead.stdout.strip()}.7", ".tmp-trials.md"]  # killed writers'
    alive = [f".tmp-trials.md.{os.getpid()}.1", f".tmp-trials.md.json.{dead.stdout.strip()}.7"]  # in use; another file's
    for name in leftovers + alive:
        (tmp_path / name).write_text("partial")
    files.write_text(str(path), "new\n")
    assert sorted(os.listdir(tmp_path)) == sorted(["trials.md", *alive])
