"""predict.py on large files (issue 24): chunks in input order with each row's other columns, bad rows set aside
(rejects file, exit status 3), nothing written in place, --resume after kill -9 byte for byte, torchrun and --shard
giving one process's bytes, .gz input, --embeddings and --label-column through the same stream, progress lines,
the Python API's streaming call and its refusals. A tiny BERT (tests/golden/bert) on made-up rows keeps it fast."""
import csv
import errno
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import predict
import side.files
import side.output
import side.progress
import side.stream
from metrics import compute_metrics
from test_robustness import GOLDEN_BERT, ROOT, WORDS, free_port, tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    return {"model": tiny_checkpoint(root / "model"), "root": root}


def write_notes(path, n, seed=0, bad=()):
    """note_id, text, site, label rows of made-up words; rows in `bad` (0-based) have an empty text."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["note_id", "text", "site", "label"])
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
            writer.writerow([f"n{i:04d}", "" if i in bad else text, f"s{i % 3}", f"LABEL_{i % 3}"])
    return str(path)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def run_predict(*args):
    """predict.main's exit status (0 when it returns)."""
    try:
        predict.main([str(a) for a in args])
    except SystemExit as stop:
        return stop.code
    return 0


def test_rows_keep_their_columns_and_order_and_bad_rows_are_set_aside(tiny, tmp_path, capsys):
    notes = write_notes(tmp_path / "notes.csv", 30, bad={4, 17})
    with open(notes, "a", newline="") as f:  # a line whose quotes do not parse, then a good row after it
        f.write('n0030,"w1 w2" w3,s0,LABEL_0\nn0031,w4 w5,s1,LABEL_1\n')
    output = tmp_path / "labels.csv"
    assert run_predict("--model", tiny["model"], "--input", notes, "--output", output, "--chunk-rows", 4) == 3
    rows, given = list(csv.DictReader(open(output))), list(csv.DictReader(open(notes)))[:30]
    good = [g for i, g in enumerate(given) if i not in (4, 17)]
    assert list(rows[0]) == ["note_id", "site", "input_label", "label", "probability"]
    assert [r["note_id"] for r in rows] == [g["note_id"] for g in good] + ["n0031"]
    predictions = predict.Predictor(tiny["model"], device="cpu").predict([g["text"] for g in good] + ["w4 w5"])
    assert [(r["label"], r["probability"]) for r in rows] == [(p["label"], f"{p['probability']:.4f}")
                                                              for p in predictions]
    rejects = [json.loads(line) for line in open(tmp_path / "labels.rejects.jsonl")]
    assert [(r["row"], r["line"], r.get("note_id")) for r in rejects] == [(5, 6, "n0004"), (18, 19, "n0017"),
                                                                          (31, 32, None)]
    assert rejects[0]["reason"] == ("empty text in column 'text' (nothing, or only spaces and invisible "
                                    "characters)") and "malformed" in rejects[2]["reason"]
    err = capsys.readouterr().err
    assert "3 row(s) set aside" in err and "labels.rejects.jsonl" in err
    # --keep-text writes the text too; a run without bad rows removes an old rejects file and exits 0
    clean = write_notes(tmp_path / "clean.csv", 6)
    assert run_predict("--model", tiny["model"], "--input", clean, "--output", output, "--keep-text") == 0
    assert list(csv.DictReader(open(output)))[0]["text"] == list(csv.DictReader(open(clean)))[0]["text"]
    assert not os.path.exists(tmp_path / "labels.rejects.jsonl")


def test_jsonl_fields_and_gzip_input(tiny, tmp_path):
    """JSONL in, JSONL out: fields keep their JSON values; the same rows gzip-compressed give the same bytes."""
    records = [{"id": i, "text": " ".join(WORDS[i:i + 5]), "meta": {"ward": i % 2}} for i in range(9)]
    plain = tmp_path / "notes.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in records))
    with gzip.open(tmp_path / "notes.jsonl.gz", "wt") as f:
        f.write(plain.read_text())
    for name in ("notes.jsonl", "notes.jsonl.gz"):
        assert run_predict("--model", tiny["model"], "--input", tmp_path / name, "--output",
                           tmp_path / f"{name}.out.jsonl", "--chunk-rows", 4) == 0
    assert sha256(tmp_path / "notes.jsonl.out.jsonl") == sha256(tmp_path / "notes.jsonl.gz.out.jsonl")
    out = [json.loads(line) for line in open(tmp_path / "notes.jsonl.out.jsonl")]
    assert [(o["id"], o["meta"]) for o in out] == [(r["id"], r["meta"]) for r in records]
    assert "text" not in out[0] and set(out[0]["probabilities"]) == {"LABEL_0", "LABEL_1", "LABEL_2"}


def test_a_bad_file_is_refused_before_the_model_loads(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(predict, "Predictor", None)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("text\ncaf\xe9 au lait\n".encode("latin1"))
    (tmp_path / "fake.csv.gz").write_bytes(b"text\nnot gzip\n")
    (tmp_path / "header.csv").write_text("note_id,text\n")
    cases = {"latin1.csv": r"line 2 \(byte offset 8\): byte 0xe9 is not valid UTF-8",
             "fake.csv.gz": r"fake.csv.gz: cannot read it as gzip", "header.csv": r"no data rows after the header",
             "missing.csv": r"missing.csv: file not found"}
    for name, message in cases.items():
        with pytest.raises(SystemExit, match=f"data error: .*{message}"):
            predict.main(["--model", tiny["model"], "--input", str(tmp_path / name)])
    with pytest.raises(SystemExit, match=r"column\(s\) \['body'\] not found"):
        predict.main(["--model", tiny["model"], "--input", str(tmp_path / "header.csv"), "--text-column", "body"])


def test_bytes_that_are_not_utf8_mid_file_set_one_row_aside(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(side.stream, "UTF8_CHECK_BYTES", 16)  # the file's start is checked; the rest is mid-file
    path = tmp_path / "notes.csv"
    path.write_bytes(b"note_id,text\na,w1 w2\nb,caf\xe9\nc,w3\n")
    assert run_predict("--model", tiny["model"], "--input", path, "--output", tmp_path / "out.jsonl") == 3
    assert [json.loads(line)["note_id"] for line in open(tmp_path / "out.jsonl")] == ["a", "c"]
    reject = json.loads(open(tmp_path / "out.rejects.jsonl").read())
    assert reject == {"row": 2, "line": 3, "note_id": "b", "reason": "line 3: byte 0xe9 is not valid UTF-8"}


def test_existing_output_survives_a_full_disk(tiny, tmp_path, monkeypatch):
    notes = write_notes(tmp_path / "notes.csv", 20)
    output = tmp_path / "labels.csv"
    output.write_text("the last good labels\n")
    calls = []

    real_write = side.files.Appender.write

    def full_after_two(appender, data):
        calls.append(1)
        if len(calls) > 2:
            with side.files.writing(appender.path):
                raise OSError(errno.ENOSPC, "No space left on device")
        real_write(appender, data)

    monkeypatch.setattr(side.files.Appender, "write", full_after_two)
    with pytest.raises(SystemExit, match=rf"^cannot write {output}.partial: No space left on device; an existing "
                                         r"output file is untouched"):
        predict.main(["--model", tiny["model"], "--input", notes, "--output", str(output), "--chunk-rows", "5"])
    assert output.read_text() == "the last good labels\n"
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=r"an interrupted run's work is there: run the same command with --resume to "
                                         r"continue it, or `rm -f .*labels.csv.resume.json .*labels.csv.partial "
                                         r".*labels.rejects.jsonl.partial` to start over$"):
        predict.main(["--model", tiny["model"], "--input", notes, "--output", str(output), "--chunk-rows", "5"])
    assert run_predict("--model", tiny["model"], "--input", notes, "--output", output, "--chunk-rows", 5,
                       "--resume") == 0
    assert len(list(csv.DictReader(open(output)))) == 20 and not os.path.exists(f"{output}.resume.json")


KILLED_AFTER = """
import os, sys
sys.path.insert(0, {root!r})
import predict, side.output
commit = side.output.ChunkWriter.commit
def commit_then_die(self, output, *args):
    if self.chunks == {chunks}:  # half a chunk on disk, then kill -9: a torn chunk that --resume must cut off
        self.partials[0].write(output[:len(output) // 2])
        os.kill(os.getpid(), 9)
    commit(self, output, *args)
side.output.ChunkWriter.commit = commit_then_die
predict.main(sys.argv[1:])
"""


@pytest.mark.parametrize("kind", ["labels.csv", "vectors.npy"])
def test_resume_after_kill_9_gives_the_uninterrupted_bytes(tiny, tmp_path, kind):
    notes = write_notes(tmp_path / "notes.csv", 40, bad={7})
    flag = "--embeddings" if kind.endswith(".npy") else "--output"
    job = ["--model", tiny["model"], "--input", notes, "--chunk-rows", "6"]
    (tmp_path / "whole").mkdir()
    whole, output = tmp_path / "whole" / kind, tmp_path / kind
    assert run_predict(*job, flag, whole) == 3
    script = KILLED_AFTER.format(root=ROOT, chunks=3)
    # the killed run computes with this process's threads: another count changes the last bits of a vector
    killed = subprocess.run([sys.executable, "-c", script, *job, flag, str(output)], capture_output=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert killed.returncode == -9 and not output.exists()
    assert json.load(open(f"{output}.resume.json"))["chunks"] == 3
    with pytest.raises(SystemExit, match=r"cannot --resume .*--batch-size \(64 then, 8 now\) changed"):
        predict.main([*job, "--batch-size", "8", flag, str(output), "--resume"])
    assert run_predict(*job, flag, output, "--resume") == 3
    assert sha256(output) == sha256(whole)
    rejects = f"{kind.split('.')[0]}.rejects.jsonl"
    assert sha256(tmp_path / rejects) == sha256(tmp_path / "whole" / rejects)
    if kind.endswith(".npy"):
        vectors = np.load(output, mmap_mode="r")
        assert vectors.shape == (40, 32) and np.isnan(vectors[7]).all() and not np.isnan(vectors[6]).any()


def test_resume_refuses_a_changed_input(tiny, tmp_path):
    notes = write_notes(tmp_path / "notes.csv", 12)
    output = tmp_path / "labels.jsonl"
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER.format(root=ROOT, chunks=1), "--model",
                             tiny["model"], "--input", notes, "--chunk-rows", "4", "--output", str(output)],
                            capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9
    write_notes(notes, 12, seed=1)
    with pytest.raises(SystemExit, match=r"cannot --resume .*labels.jsonl: input changed since the run began"):
        predict.main(["--model", tiny["model"], "--input", notes, "--chunk-rows", "4", "--output", str(output),
                      "--resume"])


def test_shards_and_torchrun_give_one_process_bytes(tiny, tmp_path):
    """--shard 0/2 + 1/2, concatenated, and torchrun with 2 CPU processes (gloo) write the bytes one process does."""
    notes = write_notes(tmp_path / "notes.csv", 23, bad={9})
    job = ["--model", tiny["model"], "--input", notes, "--chunk-rows", "4"]
    assert run_predict(*job, "--output", tmp_path / "one.csv") == 3
    assert run_predict(*job, "--output", tmp_path / "part0.csv", "--shard", "0/2") == 3  # row 10 is in chunk 2
    assert run_predict(*job, "--output", tmp_path / "part1.csv", "--shard", "1/2") == 0
    merged = open(tmp_path / "part0.csv", "rb").read() + open(tmp_path / "part1.csv", "rb").read()
    assert hashlib.sha256(merged).hexdigest() == sha256(tmp_path / "one.csv")
    with pytest.raises(SystemExit, match=r"--shard 2/2: K must be between 0 and N - 1"):
        predict.main([*job, "--output", str(tmp_path / "x.csv"), "--shard", "2/2"])

    torchrun = shutil.which("torchrun")
    if torchrun is None or not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torchrun with gloo is not available here")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    command = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), os.path.join(ROOT, "predict.py"),
               *job, "--output", str(tmp_path / "two.csv")]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("torchrun did not finish in 120 s (no process group on this machine?)")
    group_failed = any(sign in done.stderr for sign in ("init_process_group", "Gloo", "RendezvousError"))
    if not (tmp_path / "two.csv").exists() and group_failed:
        pytest.skip(f"torchrun could not start a gloo group here: {done.stderr[-500:]}")
    assert "exitcode  : 3" in done.stderr  # rank 0 set a row aside; torchrun reports its status
    assert sha256(tmp_path / "two.csv") == sha256(tmp_path / "one.csv")
    assert sha256(tmp_path / "two.rejects.jsonl") == sha256(tmp_path / "one.rejects.jsonl")


def test_scoring_and_embeddings_stream_too(tiny, tmp_path):
    notes = write_notes(tmp_path / "notes.csv", 14)
    predictor = predict.Predictor(tiny["model"], device="cpu")
    given = list(csv.DictReader(open(notes)))
    logits = predictor.logits([g["text"] for g in given])
    metrics = predict.main(["--model", tiny["model"], "--input", notes, "--label-column", "label", "--chunk-rows", "4"])
    expected = compute_metrics(logits, np.array([int(g["label"][-1]) for g in given]), False)
    assert metrics == pytest.approx(expected, abs=1e-6)
    with open(notes, "a") as f:
        f.write("n0014,w1 w2,s0,LABEL_9\n")
    with pytest.raises(SystemExit, match=r"data error: .*notes.csv: 1 occurrence\(s\) of 1 label\(s\) not seen in "
                                         r"training: 'LABEL_9' \(row 15\)"):
        predict.main(["--model", tiny["model"], "--input", notes, "--label-column", "label", "--chunk-rows", "4"])
    assert run_predict("--model", tiny["model"], "--input", notes, "--embeddings", tmp_path / "v.npy",
                       "--chunk-rows", "4") == 0
    vectors = np.load(tmp_path / "v.npy")
    texts = [g["text"] for g in given] + ["w1 w2"]
    assert vectors.shape == (15, 32) and np.abs(vectors - predictor.embeddings(texts)).max() <= 1e-6


def test_progress_lines_in_a_log(tiny, tmp_path, capsys):
    notes = write_notes(tmp_path / "notes.csv", 12)
    predict.main(["--model", tiny["model"], "--input", notes, "--output", str(tmp_path / "o.csv"), "--chunk-rows",
                  "4", "--progress-every", "0"])
    lines = [line for line in capsys.readouterr().err.splitlines() if "rows/s" in line]
    assert [line.split(" rows,")[0] for line in lines] == ["4", "8", "12", "12"]
    assert "% of the file, ETA" in lines[0] and lines[-1].split(", ")[2] == "100% of the file"


def test_python_api_streams_and_refuses_what_it_cannot_label(tiny):
    predictor = predict.Predictor(tiny["model"], device="cpu", batch_size=2)
    texts = [" ".join(WORDS[i:i + 1 + i % 7]) for i in range(11)]
    expected = predictor.predict(texts)
    rows = ({"id": i, "text": t} for i, t in enumerate(texts))  # a generator, as a database cursor gives rows
    streamed = list(predictor.stream(rows, chunk_rows=3))
    assert [s["id"] for s in streamed] == list(range(11)) and "text" not in streamed[0]
    assert [s["label"] for s in streamed] == [e["label"] for e in expected]
    assert [s["probability"] for s in predictor.stream(iter(texts), chunk_rows=4)] == pytest.approx(
        [e["probability"] for e in expected], abs=1e-6)
    with pytest.raises(TypeError, match=r"not one string"):
        predictor.predict("one text")
    with pytest.raises(TypeError, match=r"text 2 \(of 2\) is NoneType, not a string"):
        predictor.predict(["w1", None])
    with pytest.raises(ValueError, match=r"2 texts but 1 pairs"):
        predictor.predict(["w1", "w2"], ["w3"])
    with pytest.raises(TypeError, match=r"text 1 \(of 1\) is NoneType"):
        list(predictor.stream([{"id": 1}]))


def test_device_and_folder_without_a_classifier(tiny, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the problem was found")

    with monkeypatch.context() as patch:
        patch.setattr(predict.EncoderClassifier, "from_pretrained", refuse)
        with pytest.raises(SystemExit, match=r"--device gpu is not a device torch knows: use cpu, cuda or cuda:N"):
            predict.main(["--model", tiny["model"], "--text", "w1", "--device", "gpu"])
        if not torch.cuda.is_available():
            with pytest.raises(SystemExit, match=r"--device cuda: torch .* sees no GPU here"):
                predict.main(["--model", tiny["model"], "--text", "w1", "--device", "cuda"])
    bare = tmp_path / "bare"
    tiny_checkpoint(bare)
    config = json.load(open(os.path.join(GOLDEN_BERT, "config.json")))
    for key in ("id2label", "label2id"):
        config.pop(key)
    json.dump(config, open(bare / "config.json", "w"))
    with pytest.raises(SystemExit, match=r"cannot use the checkpoint .*bare to label texts: it has no classifier"):
        predict.main(["--model", str(bare), "--text", "w1"])


def test_out_of_memory_halves_the_batches(tiny, monkeypatch, capsys):
    predictor = predict.Predictor(tiny["model"], device="cpu", batch_size=8)
    seqs = predictor.encoder.encode(["w1 w2", "w3"])
    expected, calls = predictor.score(seqs), []

    def score(seqs):
        calls.append(predictor.batch_size)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return predictor.score(seqs)

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert np.array_equal(predict.out_of_memory_retry(predictor, score, seqs), expected) and calls == [8, 4]
    assert "batches of at most 4 texts" in capsys.readouterr().err


def test_long_documents_and_int8_go_through_the_stream(tiny, tmp_path, capsys):
    notes = write_notes(tmp_path / "notes.csv", 10)
    texts = [g["text"] for g in csv.DictReader(open(notes))]
    output = tmp_path / "windows.jsonl"
    predict.main(["--model", tiny["model"], "--input", notes, "--output", str(output), "--long-docs", "windows_mean",
                  "--max-length", "8", "--chunk-rows", "3"])
    expected = predict.Predictor(tiny["model"], device="cpu", max_length=8, long_docs="windows_mean").predict(texts)
    written = [json.loads(line) for line in open(output)]
    assert [w["label"] for w in written] == [e["label"] for e in expected]
    assert [w["probability"] for w in written] == pytest.approx([e["probability"] for e in expected], abs=1e-6)
    capsys.readouterr()
    predict.main(["--model", tiny["model"], "--input", notes, "--int8", "--chunk-rows", "4"])
    err = capsys.readouterr().err
    assert "scored 10 texts in" in err and "int8 against fp32 on the first 4 (of 10) texts: the same label for" in err


def test_jsonl_fields_missing_from_the_csv_header_are_reported(tiny, tmp_path, capsys):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"id": 1, "text": "w1 w2"}\n{"id": 2, "text": "w3", "ward": "b"}\n')
    predict.main(["--model", tiny["model"], "--input", str(path), "--output", str(tmp_path / "out.csv")])
    assert [r["id"] for r in csv.DictReader(open(tmp_path / "out.csv"))] == ["1", "2"]
    assert "note: fields ['ward'] of some rows are not among the first row's" in capsys.readouterr().err


def test_progress_is_one_line_in_place_on_a_terminal():
    class Terminal(list):
        isatty = staticmethod(lambda: True)
        write = list.append
        flush = staticmethod(lambda: None)

    out = Terminal()
    progress = side.progress.Progress(total_bytes=1000, every=0, out=out)
    progress.update(100, 250)
    progress.update(200, 500)
    progress.done()
    assert out[0].startswith("\r100 rows, ") and ", 25% of the file, ETA " in out[0]
    assert out[1].startswith("\r200 rows, ") and out[-1] == "\n" and len(out) == 3
    assert side.progress.duration(3725) == "1h02m05s" and side.progress.duration(65) == "1m05s"


def test_label_names_in_the_output_and_the_page_with_the_true_labels(tiny, tmp_path, capsys):
    """--label-names names each label beside its code (output and page); --label-column with --explain-html puts
    each text's true labels under its predicted ones, a missed one marked."""
    notes = write_notes(tmp_path / "notes.csv", 12)
    names = tmp_path / "names.csv"
    names.write_text("code,name\nLABEL_0,pleural effusion\nLABEL_1,pulmonary nodule\n")
    named = {"LABEL_0": "pleural effusion", "LABEL_1": "pulmonary nodule"}
    out = tmp_path / "out.csv"
    assert run_predict("--model", tiny["model"], "--input", notes, "--output", out, "--label-names", names) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 12 and all(r["name"] == named.get(r["label"], r["label"]) for r in rows)
    page = tmp_path / "page.html"
    assert run_predict("--model", tiny["model"], "--input", notes, "--label-column", "label", "--explain-html", page,
                       "--label-names", names) == 0
    assert "accuracy" in json.loads(capsys.readouterr().out)  # the metrics, as without the page
    html = page.read_text()
    gold = re.findall(r'<li class="(found|missed)" data-gold="([^"]+)">([^<]+)</li>', html)
    assert [code for _, code, _ in gold] == [f"LABEL_{i % 3}" for i in range(12)]
    assert all((kind == "missed") == text.endswith("(missed)") for kind, _, text in gold)
    assert "pleural effusion (LABEL_0)" in html
    names.write_text("C1,a\nC2,b\n")
    assert "none of its 2 codes is a label of the checkpoint" in str(
        run_predict("--model", tiny["model"], "--input", notes, "--label-names", names))


def test_label_names_keep_an_input_column_called_name(tiny, tmp_path):
    """With --label-names the output has a name column: an input column of that name is renamed, never lost."""
    notes = tmp_path / "notes.csv"
    notes.write_text("name,text\n" + "".join(f"patient {i},note number {i} about the chest\n" for i in range(5)))
    names = tmp_path / "names.csv"
    names.write_text("code,name\nLABEL_0,pleural effusion\nLABEL_1,pulmonary nodule\n")
    out = tmp_path / "out.csv"
    assert run_predict("--model", tiny["model"], "--input", notes, "--output", out, "--label-names", names) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["input_name"] for r in rows] == [f"patient {i}" for i in range(5)]
    assert all(r["name"] != r["input_name"] for r in rows)
