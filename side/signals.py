"""SIGINT (Ctrl-C) and SIGTERM (what `kill` sends, and what a scheduler such as SLURM sends before it preempts a job)
end a run with one message and a state to go on from, never a traceback; so does a reader that closes our stdout
(`predict.py ... | head -1`), quietly, as Unix tools end. No torch here: an entry point imports this module first,
so a signal while torch loads is handled too.

quiet_start(__name__)   at the top of an entry point run as a script: a signal before main() runs is one line
stopping(advice)   main()'s block (a decorator too): a signal raises Stopped where the run is, once; a later one (a second
    Ctrl-C during the clean-up) is ignored. A Stopped or BrokenPipeError main() did not turn into its own message
    ends here; the handlers from before come back at the end
held()   a block a signal does not cut: a file being written is finished, then Stopped is raised
stopped(error, advice)   the message (on its own line on a terminal), and SystemExit(128 + the signal)
"""
import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
WHAT = {signal.SIGINT: "interrupted (Ctrl-C)",
        signal.SIGTERM: "stopped by SIGTERM (a kill, or a scheduler's notice before it preempts the job)"}
BROKEN_PIPE_EXIT = 128 + 13  # the status of a Unix tool that SIGPIPE ended (Python ignores SIGPIPE: we get an error)


class Stopped(KeyboardInterrupt):
    """A signal asked the run to stop. A KeyboardInterrupt, so what cleans up after Ctrl-C cleans up after SIGTERM."""

    def __init__(self, number):
        super().__init__(number)
        self.number = number

    def __str__(self):
        return WHAT[self.number]


class _State:
    """What the handlers share: the signal acted on (None yet), how deep in held() blocks, a signal kept for later."""
    acted_on = None
    depth = 0
    pending = None


_state = _State()


def _on_signal(number, frame):
    if _state.acted_on is not None:  # the run is already stopping: a second Ctrl-C must not cut its clean-up
        return
    if _state.depth:
        _state.pending = _state.pending or number
        return
    _state.acted_on = number
    raise Stopped(number)


def _before_main(number, frame):
    if _state.acted_on is not None:
        return
    _state.acted_on = number
    say(f"{WHAT[number]} while starting: nothing was written")
    raise SystemExit(128 + number)  # out of an import too, with no traceback


def _install(handler):
    """handler for SIGINT and SIGTERM, in the main thread only (the only one Python runs handlers in). A signal
    ignored when the process began stays ignored: a shell ignores SIGINT for jobs it starts in the background."""
    before = {number: signal.getsignal(number) for number in SIGNALS}
    if threading.current_thread() is threading.main_thread():
        for number, old in before.items():
            if old is not signal.SIG_IGN:
                signal.signal(number, handler)
    return before


def quiet_start(name):
    if name == "__main__":
        _install(_before_main)


@contextlib.contextmanager
def stopping(advice="Run the same command again"):
    """advice: what to run after a stop that main() did not turn into its own message."""
    _state.acted_on, _state.depth, _state.pending = None, 0, None
    before = _install(_on_signal)
    try:
        yield
    except KeyboardInterrupt as e:  # before main() knew what to advise (reading the options), or not caught
        raise stopped(e, advice) from None
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # or Python's flush of stdout at exit fails again, loudly
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(BROKEN_PIPE_EXIT) from None
    finally:
        if _state.acted_on is None:
            _state.acted_on = 0  # done: a signal from here until the process exits changes nothing
        if threading.current_thread() is threading.main_thread():
            for number, old in before.items():
                signal.signal(number, signal.SIG_DFL if old is None else old)


@contextlib.contextmanager
def held():
    """A signal inside waits for the block's end, then stops the run (unless the block failed: that error ends it)."""
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
    if not _state.depth and _state.pending and _state.acted_on is None:
        _state.acted_on, _state.pending = _state.pending, None
        raise Stopped(_state.acted_on)


def stopped(error, advice, quiet=False):
    """The SystemExit ending a run that error (a Stopped, or Python's own KeyboardInterrupt) stopped, after its one
    message: what stopped it, and advice (what to run now). quiet: a torchrun rank other than 0, which says nothing."""
    number = getattr(error, "number", signal.SIGINT)
    if not quiet:
        say(f"{WHAT[number]}. {advice}")
    return SystemExit(128 + number)  # as a shell reports a process the signal ended


def say(message):
    """To stderr; on a terminal on a line of its own: the progress line, and the ^C the terminal echoed, are on the
    current one."""
    try:
        print(("\n" if sys.stderr.isatty() else "") + message, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed too: the exit status still tells
        pass
