"""The one writer: every file a run writes (predictions, rejects, resume state, pages, embeddings, checkpoints,
training state, logs, reports, calibration, tables) goes through here, so that a kill, a full disk or a second run
never leaves a torn file or replaces one it should not touch.

WriteFailed / writing(path, what)   an OSError (and torch's and safetensors' wrappings of one) while writing becomes
    one error naming the file and the system's reason
replacing(path) -> temp path   write beside, fsync, rename over path, fsync the folder; the temp removed on failure
write_bytes / write_text / write_json   whole files through replacing
replacing_files(folder) -> temp folder   several files (a checkpoint) written together, each renamed into folder
Appender(path)   a file that grows by whole records (a .partial output, metrics.jsonl); move / remove / fsync
collisions(outputs, reads)   what a run would write onto something it reads, or onto another of its outputs
out_file_problem(path, reads)   the same for a script's one --out file, and its folder missing
hold(path, what) / release / release_all   a lock (flock) a running run holds on its output: a second run on it is refused by
    name
"""
import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
import threading

from safetensors import SafetensorError

TEMP_PREFIX = ".tmp-"  # unfinished writes: never read; side/checkpoints.remove_debris clears them from an out-dir


class WriteFailed(Exception):
    """A file of the run could not be written: what it is, its path and the system's reason."""

    def __init__(self, what, path, reason):
        super().__init__(f"cannot write {what + ' ' if what else ''}{path}: {reason}")
        self.what, self.path, self.reason = what, path, reason


@contextlib.contextmanager
def writing(path, what=""):
    """Turn a write that fails under it into WriteFailed(what, path, reason). torch.save reports a failed write as
    a RuntimeError about stream positions, with the OSError as its context; safetensors as its own error."""
    try:
        yield
    except OSError as e:
        raise WriteFailed(what, path, os_reason(e)) from None
    except RuntimeError as e:
        if isinstance(e.__context__, KeyboardInterrupt):  # Ctrl-C inside torch.save: the signal ends the run, not
            raise e.__context__ from None                  # the writer's complaint about stream positions after it
        if not isinstance(e.__context__, OSError):
            raise
        raise WriteFailed(what, path, os_reason(e.__context__)) from None
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        raise WriteFailed(what, path, os.strerror(int(code.group(1))) if code else str(e)) from None


def os_reason(error):
    return error.strerror or str(error)


# ----------------------------------------------------------------------------- whole files

@contextlib.contextmanager
def replacing(path, what="", suffix=""):
    """Yield a temp path beside path to write the new file into; once the block ends, the file is made durable
    and renamed over path: whenever a kill comes, path holds the old file or the new one, whole. On any failure
    (a full disk, Ctrl-C) the temp is removed and path left as it was. suffix: a tool that picks its format
    from the name (Chromium's .png)."""
    folder = os.path.dirname(os.path.abspath(path))
    stem = TEMP_PREFIX + os.path.basename(path)
    # one temp per file and writer (process, thread): writers of one file (a sweep's processes) never touch each
    # other's, and the last rename wins whole; a killed writer's leftover is cleared by the next write
    tmp = os.path.join(folder, f"{stem}.{os.getpid()}.{threading.get_ident()}{suffix}")
    try:
        with writing(path, what):
            remove_dead_writers_temps(folder, stem, suffix)
            if os.path.lexists(tmp):  # a dead writer's, whose pid and thread id came round again
                os.unlink(tmp)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            yield tmp
            fsync(tmp)
            os.chmod(tmp, mode_for(path))  # private while partial; whole, the old file's mode or the umask's
            os.replace(tmp, path)
            tmp = None
            fsync(folder)
    finally:
        if tmp is not None and os.path.lexists(tmp):
            with contextlib.suppress(OSError):  # the error that brought us here is the one to report
                os.unlink(tmp)


def remove_dead_writers_temps(folder, stem, suffix):
    """The temps of one file (stem + ".PID.THREAD" + suffix, or an older stem + suffix) whose writer is gone: a
    kill's leftovers. A live process's temp is its own business."""
    pattern = re.compile(r"\.(\d+)\.\d+" + re.escape(suffix))
    for name in os.listdir(folder):
        if not name.startswith(stem):
            continue
        writer = pattern.fullmatch(name[len(stem):])
        if name[len(stem):] == suffix or (writer and not process_alive(int(writer.group(1)))):
            with contextlib.suppress(FileNotFoundError):  # another writer cleared it first
                os.unlink(os.path.join(folder, name))


def process_alive(pid):
    """Whether process pid still runs (signal 0 tests without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's, alive
        return True
    return True


def write_bytes(path, data, what=""):
    with replacing(path, what) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path, text, what=""):
    write_bytes(path, text.encode("utf-8"), what)


def write_json(path, value, what="", **dumps):
    write_text(path, json.dumps(value, **{"indent": 2, **dumps}) + "\n", what)


@contextlib.contextmanager
def replacing_files(folder, what=""):
    """Yield a temp folder inside folder; once the block ends, each file in it is made durable and renamed into
    folder (a kill mid-way leaves each file old or new, never torn), then the folder's entries are. The temp
    folder is removed on any failure."""
    with writing(folder, what):
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=folder)
        try:
            yield tmp
            for name in sorted(os.listdir(tmp)):
                fsync(os.path.join(tmp, name))
                os.replace(os.path.join(tmp, name), os.path.join(folder, name))
            fsync(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def mode_for(path):
    """The permission bits a new file at path gets: those of the file it replaces, else 0666 less the umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mask = os.umask(0)  # reading the umask means setting it: put it straight back
        os.umask(mask)
        return 0o666 & ~mask


def fsync(path):
    """Flush a file, or a folder's entries (a rename is durable only once its folder is), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- files that grow

class Appender:
    """A file that grows by whole records: a .partial output (each record durable before the run records it as
    done) or an append-only log. start: None opens path afresh (empty, or `start_bytes` zero bytes reserved for a
    header); a size keeps the file's first `size` bytes and drops what a killed write left after them; "end"
    appends to the file as it is. Every failure is a WriteFailed naming path."""

    def __init__(self, path, what="", start=None, start_bytes=0, durable=True):
        self.path, self.what, self.durable = path, what, durable
        with writing(path, what):
            if start is None:
                with open(path, "wb") as f:
                    f.write(bytes(start_bytes))
            elif start != "end":
                os.truncate(path, start)
            self.handle = open(path, "r+b" if start != "end" else "ab")
            self.handle.seek(0, os.SEEK_END)

    def write(self, data):
        """Append data (bytes, or text as UTF-8); durable: on the disk before this returns."""
        with writing(self.path, self.what):
            self.handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            self.flush(self.durable)

    def flush(self, durable=False):
        with writing(self.path, self.what):
            self.handle.flush()
            if durable:
                os.fsync(self.handle.fileno())

    def write_at(self, offset, data):
        """Overwrite the bytes at offset (the header reserved at the start), durably."""
        with writing(self.path, self.what):
            self.handle.seek(offset)
            self.handle.write(data)
            self.flush(True)
            self.handle.seek(0, os.SEEK_END)

    def tell(self):
        return self.handle.tell()

    def close(self):
        with writing(self.path, self.what):
            self.handle.close()


def move(source, path, what=""):
    """Rename source over path (the same folder: atomic), durably."""
    with writing(path, what):
        os.replace(source, path)
        fsync(os.path.dirname(os.path.abspath(path)))


def remove(path, what=""):
    """Remove a file if it is there; a failure names it."""
    with writing(path, what):
        if os.path.lexists(path):
            os.unlink(path)


# ----------------------------------------------------------------------------- the collision guard

def collisions(outputs, reads, folders=(), advice="name another file"):
    """Why the run must not start, as one message (None: it may): an output ({what: path}) that is `-`, a folder
    (unless its what is in folders: a folder the run writes into, such as train.py's checkpoints), or that is, or
    resolves to (symlinks, `..`, a hard link), a file the run reads ({what: path}; a folder read means every file
    in it, such as the model's), or that holds one, or another of its own outputs. Checked before any work."""
    problems, seen, clashed = [], {}, set()
    for what, path in outputs.items():
        if path is None:
            continue
        if path == "-":
            problems.append(f"{what} -: name a file (stdout is where predictions go without --output)")
        elif os.path.isdir(path) and what not in folders:
            problems.append(f"{what} {path} is a folder; name a file")
        else:
            # one line per file read: the files beside an output (its rejects, .partial, lock) that meet the same
            # one add nothing to the output's own line
            hits = [(role, other) for role, other in reads.items()
                    if other and role not in clashed and overlaps(path, other, both=True)]
            clashed.update(role for role, _ in hits)
            problems += [f"{what} {path} is the {role} {other}: the run would replace it" if same(path, other) else
                         f"{what} {path} lies inside the {role} {other}: the run would write into it"
                         if overlaps(path, other) else f"{what} {path} holds the {role} {other}: the run would "
                         "replace it" for role, other in hits]
            problems += [f"{what} {path} is also {role}: one file cannot be both" for role, other in seen.items()
                         if same(path, other)]
            seen[what] = path
    return "; ".join(problems) + "; " + advice if problems else None


def out_file_problem(path, reads):
    """Why a script's --out file cannot be written (None: it can), checked before the work rather than after it:
    a file the script reads ({what: path}) or a folder (collisions), or a folder that does not exist."""
    if not path:
        return None
    clash = collisions({"--out": path}, reads, advice="name another --out file")
    parent = os.path.dirname(os.path.abspath(path))
    return clash or (None if os.path.isdir(parent) else f"--out {path}: the folder {parent} does not exist")


def same(a, b):
    real_a, real_b = os.path.realpath(a), os.path.realpath(b)
    return real_a == real_b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def overlaps(path, read, both=False):
    """path is read, or lies inside the folder read (both: or read lies inside the folder path)."""
    real_path, real_read = os.path.realpath(path), os.path.realpath(read)
    inside = lambda a, b: a.startswith(b.rstrip(os.sep) + os.sep)
    return same(path, read) or inside(real_path, real_read) or (both and inside(real_read, real_path))


# ----------------------------------------------------------------------------- one run at a time

class Busy(Exception):
    """Another running process holds the lock: the message names it."""


def hold(path, what, create=True):
    """Lock path (a lock file, created if needed) for as long as this process runs: the OS releases it when the
    process ends, however it ends, so a killed run never leaves a stale lock. A second run on the same output
    gets Busy naming the running one (its pid and command). Returns the open lock file: keep it referenced.
    create=False: None when there is no lock file (no run holds one), and nothing is written."""
    while True:
        try:
            handle = open(path, "a+" if create else "r+")
        except OSError:
            if create:
                raise
            return None  # no lock file (or no folder): no run holds one
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise Busy(f"{what} is in use by a run that has not ended ({holder}): wait for it to end, or stop it; "
                       "two runs on one output would mix their files") from None
        if os.path.exists(path) and os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
            break
        handle.close()  # the run that held it removed the file as we opened it: lock the new one
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}: {' '.join(sys.argv)}"[:500])
    handle.flush()
    HELD.append(handle)
    return handle


HELD = []  # the locks this process holds: a run that ends by an exception lets go of them in release_all()


def release(handle):
    """Remove the lock file and let go (while still held: a run waiting on the old file sees it gone); None: no
    lock was taken."""
    if handle in HELD:
        HELD.remove(handle)
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        with contextlib.suppress(OSError):  # the run's work is done: a lock file that fails to close changes nothing
            handle.close()


def release_all():
    for handle in list(HELD):
        release(handle)
