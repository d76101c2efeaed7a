"""Every write point of a run failed in turn, after SQLite's crash and I/O-error tests (issue 35).

A run (an entry point's main(argv)) goes in a child process forked from the test's, so torch and the entry point are
imported once. The child counts the I/O calls it makes on paths under `root` (the run's output location): opening a
file for writing, its writes (Watched says which), fsync, truncate, rename, remove, mkdir. A count pass finds N such points;
then, for each point k and each fault, a child makes its k-th call fail:
    kill    SIGKILL just before the call (nothing after it happens: a power cut, an OOM kill)
    enospc / eio    that one call raises OSError (No space left on device / Input/output error); later calls work
The test then runs the command the run's message advises (after a kill there is none: the documented recovery,
the same command with --resume) and checks the outputs against an uninterrupted run's.

advised_argv(argv, message)   the command a closing message advises
Faults   the instrumented calls of one child; run(entry, argv, root, point, fault) -> Outcome
in_parallel(jobs, workers)   job() of each in forked processes, `workers` at a time: their results (JSON values)
"""
import builtins
import errno
import io
import json
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

FAULTS = ("kill", "enospc", "eio")
ERRORS = {"enospc": errno.ENOSPC, "eio": errno.EIO}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def advised_argv(argv, message):
    """argv as the message says to run it again: `the same command with --resume` (or --overwrite), or `the same
    command again`. A message that advises nothing runnable fails the test."""
    match = re.search(r"run the same command (with (--resume|--overwrite)|again)", message, re.IGNORECASE)
    if not match:
        match = re.search(r"run again (with) (--resume)", message)  # predict.py's failed write
    assert match, f"the message advises no command: {message}"
    flag = match.group(2)
    return list(argv) + ([flag] if flag and flag not in argv else [])


class Injected(OSError):
    """The OSError a fault point raises (an OSError: the run must treat it as the system's own)."""


class Faults:
    """The I/O calls of this process on paths under root, counted in `calls` as (what, path); the point-th fails
    with `fault`. install() patches os, builtins.open and io.open; files opened for writing under root come back
    wrapped (their write and truncate are points too)."""

    def __init__(self, root, point=None, fault=None):
        self.root, self.point, self.fault, self.calls = os.path.realpath(root), point, fault, []

    def under_root(self, path, dir_fd=None):
        """path (a name, or an open fd) resolved, when it lies under root; else None."""
        if isinstance(path, int):
            path = self.fd_path(path)
        else:
            path = os.fsdecode(path)
            if dir_fd is not None and not os.path.isabs(path):
                path = os.path.join(self.fd_path(dir_fd) or "", path)
        if not path:
            return None
        real = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
        return real if real == self.root or real.startswith(self.root + os.sep) else None

    @staticmethod
    def fd_path(fd):
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None

    def hit(self, what, *paths, dir_fd=None):
        """Count the call when one of its paths is under root; at the chosen point, the fault."""
        inside = [p for p in (self.under_root(path, dir_fd) for path in paths if path is not None) if p]
        if not inside:
            return
        self.calls.append((what, os.path.relpath(inside[-1], self.root)))
        if len(self.calls) != self.point:
            return
        if self.fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise Injected(ERRORS[self.fault], os.strerror(ERRORS[self.fault]), paths[-1])

    def install(self):
        faults = self
        real = {name: getattr(os, name) for name in ("open", "write", "replace", "rename", "fsync", "fdatasync",
                                                     "truncate", "ftruncate", "remove", "unlink", "rmdir", "mkdir",
                                                     "sendfile")}
        real_open = builtins.open

        def patched(name, what, path_args):
            def call(*args, **kwargs):
                faults.hit(what, *[args[i] for i in path_args if i < len(args)], dir_fd=kwargs.get("dir_fd"))
                return real[name](*args, **kwargs)
            return call

        for name, path_args in (("replace", (0, 1)), ("rename", (0, 1)), ("fsync", (0,)), ("fdatasync", (0,)),
                                ("truncate", (0,)), ("ftruncate", (0,)), ("remove", (0,)), ("unlink", (0,)),
                                ("rmdir", (0,)), ("mkdir", (0,)), ("write", (0,)), ("sendfile", (0,))):
            setattr(os, name, patched(name, name, path_args))

        def os_open(path, flags, *args, **kwargs):
            if flags & WRITE_FLAGS:
                faults.hit("open", path, dir_fd=kwargs.get("dir_fd"))
            return real["open"](path, flags, *args, **kwargs)
        os.open = os_open

        def open_(file, mode="r", *args, **kwargs):
            writes = any(c in mode for c in "wax+")
            if writes:
                faults.hit("open", file)
            handle = real_open(file, mode, *args, **kwargs)
            if writes and faults.under_root(file if not isinstance(file, int) else handle.fileno()):
                return Watched(handle, faults)
            return handle
        builtins.open = io.open = open_


class Watched:
    """A file opened for writing under root. Its points are where its bytes meet the system: the first write (more
    writes only fill Python's buffer, or repeat what the first's failure stands for), each flush, and the close
    (which flushes the rest); a truncate too. The rest is the file's."""

    def __init__(self, handle, faults):
        self._handle, self._faults, self._written = handle, faults, False

    def write(self, data):
        if not self._written:
            self._written = True
            self._faults.hit("write", self._handle.fileno())
        return self._handle.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        self._faults.hit("flush", self._handle.fileno())
        return self._handle.flush()

    def truncate(self, *args):
        self._faults.hit("truncate", self._handle.fileno())
        return self._handle.truncate(*args)

    def close(self):
        if not self._handle.closed:
            try:
                self._faults.hit("close", self._handle.fileno())
            finally:  # a close that fails still lets go of the file
                self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        return iter(self._handle)

    def __getattr__(self, name):
        return getattr(self._handle, name)


@dataclass
class Outcome:
    status: int  # the exit status; -9 for a kill
    stderr: str
    calls: list  # (what, path) of every point it passed


def run(entry, argv, root, point=None, fault=None):
    """entry(argv) in a forked child with Faults(root, point, fault) installed; its exit status as a shell would see
    it (SystemExit's code, 1 with a message, -signal when killed), its stderr, and the points it passed."""
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as calls:
        pid = os.fork()
        if pid == 0:
            status = child(entry, argv, root, point, fault, err, calls)
            os._exit(status)
        _, wait_status = os.waitpid(pid, 0)
        status = os.waitstatus_to_exitcode(wait_status)
        err.seek(0)
        calls.seek(0)
        text = calls.read().decode()
        return Outcome(status, err.read().decode(errors="replace"), json.loads(text) if text else None)


def child(entry, argv, root, point, fault, err, calls):
    """The child's side of run(): stdout to /dev/null, stderr to err, one thread (OpenMP after fork), the points."""
    os.dup2(err.fileno(), 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False, buffering=1)
    status = 0
    faults = Faults(root, point, fault)
    try:
        import torch
        torch.set_num_threads(1)
        faults.install()
        entry(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        status = 1 if isinstance(e.code, str) else e.code or 0
    except BaseException:
        traceback.print_exc()
        status = 99
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(calls.fileno(), json.dumps(faults.calls).encode())
    return status


def files_of(folder):
    """{relative path: bytes} of every file under folder."""
    found = {}
    for top, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(top, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def in_parallel(jobs, workers):
    """[job() for job in jobs], each in a process forked from this one, `workers` at a time; job(slot) gets its
    worker's number (0 .. workers - 1: a folder of its own) and returns a JSON value."""
    results, running, free = [None] * len(jobs), {}, list(range(workers))
    todo = list(enumerate(jobs))
    while todo or running:
        while todo and free:
            index, job = todo.pop(0)
            slot = free.pop(0)
            out = tempfile.TemporaryFile()
            pid = os.fork()
            if pid == 0:
                try:
                    value = job(slot)
                except BaseException:
                    value = f"the check itself failed:\n{traceback.format_exc()}"
                os.write(out.fileno(), json.dumps(value).encode())
                os._exit(0)
            running[pid] = (index, slot, out)
        pid = finished(running)
        index, slot, out = running.pop(pid)
        out.seek(0)
        text = out.read().decode()
        out.close()
        results[index] = json.loads(text) if text else "the check's process died"
        free.append(slot)
    return results


def finished(pids):
    """One of pids once it has ended (reaped). Only ours: os.wait() could reap a process another test waits for."""
    while True:
        for pid in pids:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return pid
        time.sleep(0.005)
