"""What a run reports while it trains: metrics.jsonl, the progress line, a table row per evaluation, the curves.

TrainLog   metrics.jsonl (rank 0 appends to it through side/files.py), training loss summed on the device, tokens/s;
    with --report-to, the same rows to TensorBoard / MLflow and the report as artifacts (side/trackers.py)
ProgressBar / evaluation_row   the lines a person watches
trim_log   --resume: the log's rows after the resumed step go (they are run again)
plot_curves -> training_curves.png, plot_reliability -> calibration.png (with matplotlib, when installed)
"""
import collections
import json
import os
import sys
import time

import numpy as np
import torch

from metrics import CALIBRATION_BINS, expected_calibration_error, reliability_bins
from side.distributed import global_mean, is_main_rank
from side import files
from side.files import writing
from side.trackers import open_trackers


class TrainLog:
    """What a run reports: metrics.jsonl (rank 0 writes it), the progress line and a table row per
    evaluation. It sums the training loss since the last evaluation on the device, and counts the tokens
    trained on since then for the throughput. columns: the evaluation row's metrics after the losses."""

    def __init__(self, out_dir, resume, progress, total_steps, steps_per_epoch, metric, columns, device,
                 report_to="none", run_options=None):
        self.main_rank = is_main_rank()  # the other ranks write to /dev/null
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.metric, self.columns, self.steps_per_epoch = metric, columns, steps_per_epoch
        resumed = progress.evals > 0  # a saved state always comes after an evaluation
        if self.main_rank and resume:
            print(f"resuming at step {progress.step}" if resumed else
                  f"--resume: no {out_dir}/last yet, starting afresh")
        with writing(self.path, "the log"):
            os.makedirs(out_dir, exist_ok=True)
            if self.main_rank and resume:
                trim_log(self.path, progress.step)
            self.file = (files.Appender(self.path, "the log", start="end" if resumed else None, durable=False)
                         if self.main_rank else open(os.devnull, "w"))
        # --report-to: each row also goes to TensorBoard / MLflow (side/trackers.py), from rank 0 only
        self.trackers = open_trackers(report_to, out_dir, run_options or {}, progress.step if resumed else None) \
            if self.main_rank else []
        self.bar = ProgressBar(total_steps, progress.step)
        self.running = torch.zeros(2, device=device)  # [sum of losses, batches]
        self.restart_clock()

    def restart_clock(self):
        self.tokens, self.clock = 0, time.time()  # the throughput of training alone
        self.bar.restart(getattr(self, "evaluated_at", None))  # an evaluation's time is no step's

    def due(self, step, every):
        """Whether step shows progress: the first step this run trains (a line within seconds of the start), every
        `every` optimizer steps, and the last."""
        return step == self.bar.first + 1 or step % every == 0 or step == self.bar.total

    def add_step(self, sums, bad, batches):
        self.running += torch.where(bad, 0.0, sums)  # a skipped step's nan stays out of the logged loss
        self.tokens += sum(real_tokens(batch) for batch, _ in batches)  # on the CPU copies: no device sync

    def training(self, step, lr, skipped):
        loss = global_mean(self.running)  # with check_bad_steps, the only host syncs between evaluations
        self.write({"kind": "train", "step": step, "loss": loss, "lr": lr, "skipped_steps": skipped})
        if self.main_rank:
            self.bar.update(step, loss, lr, self.tokens / (time.time() - self.clock))

    def evaluation(self, progress, metrics):
        """An evaluation's table row and metrics.jsonl row; metrics None (no validation data, --val-fraction 0): the
        table row without validation columns, and no metrics.jsonl row (its rows of kind eval are validation's)."""
        self.evaluated_at = progress.step
        train_loss = global_mean(self.running)
        self.running.zero_()
        epoch = progress.step / self.steps_per_epoch
        if self.main_rank:
            self.bar.newline()
            print(evaluation_row(epoch, progress.step, train_loss, metrics, self.columns, progress.evals == 0))
        if metrics is None:
            return
        self.write({"kind": "eval", "step": progress.step, "epoch": epoch, "metric": self.metric, **metrics},
                   flush=True)

    def write(self, row, flush=False):
        with writing(self.path, "the log"):  # a full disk shows here, or at the flush
            self.file.write(json.dumps(row) + "\n")
            if flush:
                self.file.flush()
        for tracker in self.trackers:
            tracker.log(row)

    def close(self):
        with writing(self.path, "the log"):
            self.file.close()
        for tracker in self.trackers:
            tracker.close()

    def publish(self):
        """--report-to: the run's report files as artifacts (once they are written); the tracked run ends."""
        names = ("report.txt", "test_metrics.json", "calibration.png", "training_curves.png", "metrics.jsonl")
        for tracker in self.trackers:
            tracker.publish([os.path.join(self.out_dir, name) for name in names])


def real_tokens(batch):
    mask = batch.get("attention_mask")
    return len(batch["input_ids"]) if mask is None else int(mask.sum())


class ProgressBar:
    """One line of progress: a live bar on a terminal, a plain line per update in a log. The ETA's pace is the time
    per step over the last WINDOW updates, so that one slow or quick stretch moves it by a share, not all the way;
    the first step's time (warm-up) counts only until another interval is measured, and an evaluation's time
    (restart) not at all."""
    WINDOW = 5

    def __init__(self, total, first=0, clock=time.monotonic):  # first: the step a resumed run starts from
        self.total, self.first, self.clock, self.tty = total, first, clock, sys.stdout.isatty()
        self.recent, self.since_step = collections.deque(maxlen=self.WINDOW), first  # (seconds, steps) per update
        self.restart()

    def restart(self, step=None):
        """The next interval of steps starts now, at step (None: where the last one ended)."""
        self.since = self.clock()
        self.since_step = self.since_step if step is None else step

    def eta(self, step):
        """Seconds left at the recent pace, with the interval that ends at step."""
        now = self.clock()
        if step > self.since_step:
            if len(self.recent) == 1 and self.since_step == self.first + 1:  # the warm-up step had its turn
                self.recent.clear()
            self.recent.append((now - self.since, step - self.since_step))
        self.since, self.since_step = now, step
        seconds, steps = (sum(x) for x in zip(*self.recent)) if self.recent else (0.0, 1)
        return seconds / steps * (self.total - step)

    def update(self, step, loss, lr, tokens_per_s):
        eta = self.eta(step)
        done = int(30 * step / self.total)
        line = (f"step {step}/{self.total} [{'#' * done}{'.' * (30 - done)}] loss {loss:.4f} lr {lr:.2e} "
                f"{tokens_per_s / 1e3:.1f}k tok/s eta {eta / 60:.1f} min")
        print("\r" + line if self.tty else line, end="" if self.tty else "\n", flush=True)

    def newline(self):
        if self.tty:
            print()


def evaluation_row(epoch, step, train_loss, metrics, columns, first):
    """A table row per evaluation, like the Hugging Face Trainer's (metrics None: no validation columns)."""
    cells = [("epoch", f"{epoch:.2f}"), ("step", str(step)), ("train_loss", f"{train_loss:.4f}")]
    if metrics is not None:
        cells += [("val_loss", f"{metrics['loss']:.4f}")] + [(c, f"{metrics[c]:.4f}") for c in columns]
    widths = [max(len(name), len(value)) for name, value in cells]
    header = " | ".join(name.rjust(w) for (name, _), w in zip(cells, widths))
    row = " | ".join(value.rjust(w) for (_, value), w in zip(cells, widths))
    return (header + "\n" + "-" * len(header) + "\n" + row) if first else row


def trim_log(path, step):
    """Keep metrics.jsonl's rows up to the resumed step: the steps after it are run (and logged) again. The log is
    replaced whole: a kill now leaves the old one."""
    rows = open(path).readlines() if os.path.isfile(path) else []
    files.write_text(path, "".join(row for row in rows if row.endswith("\n") and json.loads(row)["step"] <= step))


def pyplot(missing):
    """matplotlib's pyplot drawing to files, or None (and a note saying what is missing) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: {missing}")
        return None
    return plt


def plot_curves(log_path, png_path):
    """Training loss and the validation metric against steps; needs matplotlib (optional)."""
    plt = pyplot("no training_curves.png (the numbers are in metrics.jsonl)")
    if plt is None:
        return
    rows = [json.loads(line) for line in open(log_path)]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        a.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="val loss")
        metric = evals[0]["metric"]
        b.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-", color="C2")
        b.set_xlabel("step"), b.set_title(f"validation {metric}")
    else:  # a finished run evaluated at least once: it had no validation data
        b.set_axis_off(), b.set_title("no validation data (--val-fraction 0)")
    a.set_xlabel("step"), a.legend()
    fig.tight_layout()
    with files.replacing(png_path, "the curves", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def plot_reliability(png_path, curves):
    """A reliability diagram: per confidence bin (metrics.reliability_bins), how often the outcome came true
    against the mean confidence, one line per curve (name -> (confidence, outcome)); the diagonal is perfect
    calibration. Below it, how many decisions each bin holds. Needs matplotlib (optional)."""
    plt = pyplot("no calibration.png (ECE and Brier are in report.txt)")
    if plt is None:
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], ":", color="gray", label="perfectly calibrated")
    width = 1 / CALIBRATION_BINS
    for i, (name, (confidence, outcome)) in enumerate(curves.items()):
        count, mean_confidence, frequency = reliability_bins(confidence, outcome)
        used = count > 0
        ece = expected_calibration_error(confidence, outcome)
        top.plot(mean_confidence[used], frequency[used], "o-", label=f"{name} (ECE {ece:.3f})")
        centres = (np.arange(CALIBRATION_BINS) + 0.5) * width
        bottom.bar(centres + (i - 0.5) * width / 3, count, width / 3, label=name)
    top.set_ylabel("observed frequency"), top.legend(fontsize=8), top.set_xlim(0, 1), top.set_ylim(0, 1)
    bottom.set_yscale("log"), bottom.set_xlabel("predicted probability"), bottom.set_ylabel("decisions")
    fig.tight_layout()
    with files.replacing(png_path, "the reliability diagram", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
