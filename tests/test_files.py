"""side/files.py, the one writer (issue 35): whole files replaced only once whole, one error naming the file, the
collision guard, and the lock a running run holds. Milliseconds each: no model."""
import errno
import os
import subprocess
import sys

import pytest

from side import files
from test_robustness import ROOT


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
