"""predict.py's output files, written through side/files.py so that they are never torn and a long run can resume.

ChunkWriter(path, fingerprint, resume) appends whole chunks to PATH.partial (and the rows set aside to the rejects
file's .partial) and, after each, records in PATH.resume.json how many chunks are complete and the size and sha256
of the bytes written so far; finish() renames the partials to their names. An existing file at PATH is replaced
only then: a run that dies, a full disk, a kill -9 leave it whole. resume=True checks the partials against the
state (a partial missing, shorter, or whose recorded bytes changed is refused; bytes after them, a chunk a kill
cut off, are dropped) and goes on after the last complete chunk, if the input, the model and the options are
those the run began with (fingerprint). A damaged state is refused, naming the files and the command that starts
over. A .npy output reserves NPY_HEADER_BYTES for its header, written at finish() once the number of rows is known.
"""
import hashlib
import json
import os
import shlex

import numpy as np

from side import files

NPY_HEADER_BYTES = 128  # magic, version, length and the header dict, padded: room for any 2-d or 3-d shape
OUTPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}  # what --output writes, by its name
STATE_KEYS = ("fingerprint", "chunks", "rows", "rejected", "sizes", "sha256")


class ResumeRefused(Exception):
    """An interrupted run's state is there but not continued, or --resume cannot continue it: the message says why
    and which command works."""


def rejects_path(output):
    """Where the rows set aside go: beside the output, predictions.csv -> predictions.rejects.jsonl."""
    return os.path.splitext(output)[0] + ".rejects.jsonl"


def output_format(path):
    """The format of --output, from its name (any case): csv, tsv or jsonl (stdout: jsonl); None for another name."""
    if not path:
        return "jsonl"
    return OUTPUT_FORMATS.get(os.path.splitext(path)[1].lower())


def planned_outputs(output, flag="--output"):
    """{what: path} of every file a run writing output writes beside it: the collision guard's list."""
    rejects = rejects_path(output)
    beside = {"rejects file": rejects, "partial file": output + ".partial",
              "partial rejects file": rejects + ".partial", "resume state": output + ".resume.json",
              "lock": output + ".lock"}
    return {flag: output, **{f"{flag} {output}'s {what}": path for what, path in beside.items()}}


def npy_header(shape, dtype=np.float32):
    """A .npy (version 1.0) header of exactly NPY_HEADER_BYTES for an array of shape and dtype, C order."""
    text = f"{{'descr': '{np.dtype(dtype).str}', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    size = NPY_HEADER_BYTES - 10
    if len(text) + 1 > size:
        raise ValueError(f"shape {shape} does not fit a {NPY_HEADER_BYTES}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + size.to_bytes(2, "little") + (text.ljust(size - 1) + "\n").encode("latin1")


def fingerprint_of_file(path):
    """What tells a file changed without reading all of it: size, modification time, its first MiB's hash."""
    stat = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "first_mib_sha256": head}


class ChunkWriter:
    """Chunks of output (bytes) appended in order, resumable; see the module's docstring."""

    def __init__(self, path, fingerprint, resume=False, head_bytes=0, rejects=None):
        self.path, self.rejects, self.fingerprint = path, rejects, fingerprint
        self.state_path = path + ".resume.json"
        self.head_bytes = head_bytes  # the .npy header's room: written last, so the digests leave it out
        self.files = [path + ".partial", *([rejects + ".partial"] if rejects else [])]
        self.start_over = f"rm -f {' '.join(shell_word(f) for f in [self.state_path, *self.files])}"
        state = self._trusted_state()
        if state is not None and not resume:
            raise ResumeRefused(f"{self.state_path}: an interrupted run's work is there: run the same command with "
                                f"--resume to continue it, or `{self.start_over}` to start over")
        if state is not None:
            changed = changes(state["fingerprint"], fingerprint)
            if changed:
                raise ResumeRefused(f"cannot --resume {path}: {', '.join(changed)} changed since the run began; "
                                    f"`{self.start_over}`, then run again without --resume")
            self.chunks, self.rows, self.rejected = state["chunks"], state["rows"], state["rejected"]
            self.sizes, self.digests = state["sizes"], state["digests"]
        else:
            self.chunks = self.rows = self.rejected = 0
            self.sizes, self.digests = [head_bytes, 0][:len(self.files)], [hashlib.sha256() for _ in self.files]
        start = (lambda size: size) if state is not None else (lambda size: None)
        self.partials = [files.Appender(name, start=start(size), start_bytes=size)
                         for name, size in zip(self.files, self.sizes)]

    def commit(self, output, rejects=b"", rows=0, rejected=0):
        """Append one chunk's output and rejects, make them durable, then record the chunk as complete."""
        for partial, digest, data in zip(self.partials, self.digests, (output, rejects)):
            partial.write(data)
            digest.update(data)
        self.chunks, self.rows, self.rejected = self.chunks + 1, self.rows + rows, self.rejected + rejected
        self.sizes = [partial.tell() for partial in self.partials]
        files.write_json(self.state_path, {"fingerprint": self.fingerprint, "chunks": self.chunks, "rows": self.rows,
                                           "rejected": self.rejected, "sizes": self.sizes,
                                           "sha256": [d.hexdigest() for d in self.digests]}, indent=None)

    def finish(self, head=b""):
        """Write the head (a .npy header) at the start, rename the partials to their names, forget the state. With
        no rows set aside, a rejects file of an earlier run is removed: it is not about this output (the collision
        guard made sure it is not a file the run reads)."""
        if head:
            self.partials[0].write_at(0, head)
        for partial in self.partials:
            partial.close()
        if self.rejects and not self.rejected:
            files.remove(self.files[1])
            files.remove(self.rejects)
        elif self.rejects:
            files.move(self.files[1], self.rejects)
        files.move(self.files[0], self.path)
        files.remove(self.state_path)  # none when no chunk was this run's (a shard with no chunks)

    def _trusted_state(self):
        """The state of an interrupted run with each partial's digest at its recorded size, or None without one;
        ResumeRefused when the state or a partial cannot be trusted."""
        if not os.path.lexists(self.state_path):
            return None
        state, problem = read_state(self.state_path)
        state = state or {}
        if state and not len(state["sizes"]) == len(state["sha256"]) == len(self.files):
            problem = f"{self.state_path} records {len(state['sizes'])} files, this run writes {len(self.files)}"
        digests = []
        for name, final, size, sha256, start in zip(self.files, [self.path, self.rejects], state.get("sizes", []),
                                                    state.get("sha256", []), (self.head_bytes, 0)):
            problem = problem or (not_finished(name, final, start, size, sha256) and partial_problem(name, size))
            digests.append(None if problem else digest_of(name, start, size))
            if not problem and digests[-1].hexdigest() != sha256:
                problem = f"{name}'s first {size} bytes are not those the run wrote (their sha256 differs)"
        if problem:
            raise ResumeRefused(f"cannot continue the interrupted run of {self.path}: {problem}; its work cannot be "
                                f"trusted: `{self.start_over}`, then run the same command without --resume")
        state["digests"] = digests
        return state


def read_state(path):
    """(the state dict, None) or (None, what is wrong with the file)."""
    try:
        with open(path, "rb") as f:
            state = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        return None, f"cannot read {path} ({files.os_reason(e)})"
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, f"{path} is empty or damaged (not the JSON a run writes)"
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else STATE_KEYS
    if missing:
        return None, f"{path} is damaged (no {', '.join(missing)})"
    counts = lambda values: isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)
    if not (counts(state["sizes"]) and counts([state[k] for k in ("chunks", "rows", "rejected")])
            and isinstance(state["sha256"], list) and isinstance(state["fingerprint"], dict)):
        return None, f"{path} is damaged (its counts or checksums are not what a run writes)"
    return state, None


def not_finished(partial, final, start, size, sha256):
    """False when finish() had moved partial to final (or removed an empty one) before a kill or a failure cut it:
    partial is put back, to be finished again. final holds exactly the recorded bytes then (from start: a .npy
    header is written last)."""
    if os.path.lexists(partial):
        return True
    if size == 0:  # an empty rejects partial, removed when no row was set aside
        files.write_bytes(partial, b"")
        return False
    if not os.path.isfile(final) or os.path.getsize(final) != size or digest_of(final, start, size).hexdigest() != sha256:
        return True
    files.move(final, partial)
    return False


def partial_problem(name, size):
    """Why the partial file name cannot hold the size bytes its complete chunks wrote: missing, or shorter."""
    if not os.path.isfile(name):
        return f"{name} is missing"
    have = os.path.getsize(name)
    if have < size:
        return f"{name} holds {have} bytes, fewer than the {size} its complete chunks wrote"
    return None


def digest_of(path, start, stop):
    """sha256 of the bytes start..stop of path, ready to take the bytes that follow."""
    digest = hashlib.sha256()
    size = stop - start
    with open(path, "rb") as f:
        f.seek(start)
        while size > 0:
            block = f.read(min(size, 1 << 20))
            if not block:
                break
            digest.update(block)
            size -= len(block)
    return digest


def shell_word(text):
    """A path as a shell word (quoted when it needs to be), for a command the user copies."""
    return shlex.quote(text)


def changes(before, now):
    """What differs between the fingerprints of the run that began and this one: --resume continues only the run
    that was (same input, model and options), or the output would not be the one an uninterrupted run writes."""
    changed = [what for what in ("input", "model") if before.get(what) != now[what]]
    options = before.get("options", {})
    return changed + [f"--{k.replace('_', '-')} ({options.get(k)!r} then, {v!r} now)"
                      for k, v in now["options"].items() if options.get(k) != v]
