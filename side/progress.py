"""The progress line of a long predict.py run, on stderr: rows done, rows per second, how much of the file is read
and the time left at that pace (from the file's size: cheap, no counting pass). On a terminal one line rewritten
in place; into a log file a line every `every` seconds. (The closing speed lines: side/infer.speed_report.)"""
import sys
import time


def duration(seconds):
    """3725 -> '1h02m05s', 65 -> '1m05s', 5 -> '5s'."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02d}s"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """update(rows, bytes_read) after each chunk; done() ends the line. total_bytes 0: no ETA (texts given on the
    command line). resumed: the rows and bytes of the first update were an earlier run's (but its last chunk): the
    pace and the ETA count from there."""

    def __init__(self, total_bytes, every=None, out=None, resumed=False):
        self.out = sys.stderr if out is None else out
        self.tty = self.out.isatty()
        self.every = every if every is not None else 0.5 if self.tty else 30.0
        self.total, self.start_rows, self.start_bytes = total_bytes, 0, None if resumed else 0
        self.began = self.shown = time.monotonic()
        self.width = 0

    def update(self, rows, bytes_read, force=False):
        now = time.monotonic()
        if self.start_bytes is None:  # a resumed run's first chunk: where this run's pace starts
            self.start_rows, self.start_bytes, self.began = rows, bytes_read, now
            return
        if not force and now - self.shown < self.every:
            return
        self.shown = now
        self._show(self.line(rows, bytes_read, now - self.began))

    def line(self, rows, bytes_read, seconds):
        rate = (rows - self.start_rows) / max(seconds, 1e-9)
        text = f"{rows:,} rows, {rate:,.0f} rows/s"
        if self.total and self.start_bytes is not None and bytes_read > self.start_bytes:
            done = (bytes_read - self.start_bytes) / max(self.total - self.start_bytes, 1)
            text += f", {bytes_read / self.total:.0%} of the file, ETA {duration(seconds * (1 - done) / done)}"
        return text

    def done(self):
        if self.tty and self.width:
            self.out.write("\n")
            self.out.flush()

    def _show(self, text):
        if self.tty:
            self.out.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.out.write(text + "\n")
        self.out.flush()

