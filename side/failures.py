"""When a run cannot go on: a write that failed (disk full, permission denied, a folder removed), Ctrl-C, or out of
memory. Each ends the job with one message: what happened, where the last checkpoint is and how to continue.

writing(path, what)   a failed write under it becomes WriteFailed naming the path (side/files.py; train.py's main
    says the rest)
write_failed / interrupted   the closing messages (interrupted: the advice after side/signals.py's words);
    how_to_continue: --resume from out_dir/last, or start again
oom_message   the same global batch in smaller pieces
"""
import math
import os

import torch

from side.distributed import rank_and_world
from side.files import WriteFailed, writing  # noqa: F401 (the run's write errors, defined with the writer)


ONCE_FIXED = {"No space left on device": "Once there is space", "Permission denied": "Once the folder is writable"}


def write_failed(error, out_dir):
    """The message for a failed write: its path and reason, and how the run continues once that is fixed."""
    return f"{error}. {ONCE_FIXED.get(error.reason, 'Once that is fixed')}, run {how_to_continue(out_dir)}"


def interrupted(out_dir):
    """The advice after Ctrl-C or SIGTERM (side/signals.py says which came first)."""
    return f"Run {how_to_continue(out_dir)}"


def how_to_continue(out_dir):
    """--resume from out_dir/last when a checkpoint is there (saves are atomic: it is whole), else start again."""
    path = os.path.join(out_dir, "last", "state.pt")
    try:  # mmap: only the step is read, not the weights
        step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:  # none yet, or unreadable: either way nothing to resume from (and no traceback now)
        return "the same command with --overwrite: there is no checkpoint to resume from yet"
    return f"the same command with --resume: it continues from the last checkpoint, {path} (step {step})"


def oom_message(batch_size, grad_accum):
    """What to try after an out-of-memory error: the same global batch in smaller pieces."""
    world = rank_and_world()[1]
    smaller = max(batch_size // 2, 1)
    accum = math.ceil(batch_size * grad_accum / smaller)
    return (f"out of memory with --batch-size {batch_size} --grad-accum {grad_accum} (global batch "
            f"{batch_size * grad_accum * world}). Try --batch-size {smaller} --grad-accum {accum}: the "
            "same global batch in smaller pieces; or a shorter --max-length, --grad-checkpointing, or --fsdp")
