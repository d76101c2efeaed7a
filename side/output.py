"""predict.py's output files, written so that they are never torn and a long run can resume.

ChunkWriter(path, fingerprint, resume) appends whole chunks to PATH.partial (and the rows set aside to the rejects
file's .partial) and, after each, records in PATH.resume.json how many chunks and bytes are complete; finish()
renames the partials to their names. An existing file at PATH is replaced only then: a run that dies, a full disk,
a kill -9 leave it whole. resume=True cuts the partials back to the last complete chunk and goes on from there,
if the input, the model and the options are those the run began with (fingerprint).
A .npy output reserves NPY_HEADER_BYTES for its header, written at finish() once the number of rows is known.
"""
import hashlib
import json
import os

import numpy as np

NPY_HEADER_BYTES = 128  # magic, version, length and the header dict, padded: room for any 2-d or 3-d shape


class OutputError(Exception):
    """A file predict.py writes cannot be written (disk full, permission): the message names it."""


class ResumeRefused(OutputError):
    """An interrupted run's state is there but not continued, or --resume cannot continue it: the message says why."""


def rejects_path(output):
    """Where the rows set aside go: beside the output, predictions.csv -> predictions.rejects.jsonl."""
    return os.path.splitext(output)[0] + ".rejects.jsonl"


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
        self.state_path, self.head_bytes = path + ".resume.json", head_bytes
        self.files = [path + ".partial", *([rejects + ".partial"] if rejects else [])]
        state = self._read_state()
        if state is not None and not resume:
            raise ResumeRefused(f"{self.state_path}: an interrupted run's work is there: --resume continues it; "
                                f"delete it and {self.files[0]} to start over")
        if resume and state is not None:
            changed = changes(state["fingerprint"], fingerprint)
            if changed:
                raise ResumeRefused(f"cannot --resume {path}: {', '.join(changed)} changed since the run began; "
                                    f"run again without --resume after deleting {self.state_path}")
            self.chunks, self.rows, self.rejected = state["chunks"], state["rows"], state["rejected"]
            self.sizes = state["sizes"]
            for name, size in zip(self.files, self.sizes):
                self._do(name, os.truncate, name, size)  # the bytes of a chunk cut off mid-write
        else:
            self.chunks = self.rows = self.rejected = 0
            self.sizes = [head_bytes, 0][:len(self.files)]
            for name, size in zip(self.files, self.sizes):
                self._do(name, _write_zeros, name, size)
        self.handles = [self._do(name, open, name, "r+b") for name in self.files]
        for handle, size in zip(self.handles, self.sizes):
            handle.seek(size)

    def commit(self, output, rejects=b"", rows=0, rejected=0):
        """Append one chunk's output and rejects, make them durable, then record the chunk as complete."""
        for name, handle, data in zip(self.files, self.handles, (output, rejects)):
            self._do(name, _append, handle, data)
        self.chunks, self.rows, self.rejected = self.chunks + 1, self.rows + rows, self.rejected + rejected
        self.sizes = [handle.tell() for handle in self.handles]
        self._save_state()

    def finish(self, head=b""):
        """Write the head (a .npy header) at the start, rename the partials to their names, forget the state. With
        no rows set aside, a rejects file of an earlier run is removed: it is not about this output."""
        if head:
            self.handles[0].seek(0)
            self._do(self.files[0], _append, self.handles[0], head)
        for name, handle in zip(self.files, self.handles):
            self._do(name, handle.close)
        if self.rejects and not self.rejected:
            os.remove(self.files[1])
            if os.path.exists(self.rejects):
                os.remove(self.rejects)
        elif self.rejects:
            self._do(self.rejects, os.replace, self.files[1], self.rejects)
        self._do(self.path, os.replace, self.files[0], self.path)
        os.remove(self.state_path)

    def _save_state(self):
        state = {"fingerprint": self.fingerprint, "chunks": self.chunks, "rows": self.rows,
                 "rejected": self.rejected, "sizes": self.sizes}
        tmp = self.state_path + ".tmp"
        try:
            self._do(self.state_path, _write_text, tmp, json.dumps(state))
        except OutputError:
            os.remove(tmp)  # the state before this chunk stands: --resume redoes the chunk
            raise
        self._do(self.state_path, os.replace, tmp, self.state_path)

    def _read_state(self):
        if not os.path.exists(self.state_path):
            return None
        with open(self.state_path) as f:
            return json.load(f)

    @staticmethod
    def _do(path, action, *args):
        """action(*args), an OSError (disk full, permission) becoming an OutputError that names path."""
        try:
            return action(*args)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


def changes(before, now):
    """What differs between the fingerprints of the run that began and this one: --resume continues only the run
    that was (same input, model and options), or the output would not be the one an uninterrupted run writes."""
    changed = [what for what in ("input", "model") if before.get(what) != now[what]]
    options = before.get("options", {})
    return changed + [f"--{k.replace('_', '-')} ({options.get(k)!r} then, {v!r} now)"
                      for k, v in now["options"].items() if options.get(k) != v]


def _write_zeros(path, size):
    with open(path, "wb") as f:
        f.write(bytes(size))


def _append(handle, data):
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())


def _write_text(path, text):
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
