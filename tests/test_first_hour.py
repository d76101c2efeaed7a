"""A new user's first hour (issue 38): the first progress line within seconds of the first step, an ETA that does
not swing, a many-label report that fits a terminal."""
import io
from contextlib import redirect_stdout

from side.logs import ProgressBar, TrainLog


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_the_first_step_shows_progress_then_every_log_every_steps(tmp_path):
    from train import Progress
    with redirect_stdout(io.StringIO()):
        log = TrainLog(str(tmp_path), False, Progress(), 100, 10, "macro_f1", [], "cpu")
    assert [s for s in range(1, 101) if log.due(s, 10)] == [1, *range(10, 101, 10)]
    with redirect_stdout(io.StringIO()):
        resumed = TrainLog(str(tmp_path / "r"), False, Progress(step=40), 100, 10, "macro_f1", [], "cpu")
    assert [s for s in range(41, 101) if resumed.due(s, 25)] == [41, 50, 75, 100]


def test_the_eta_is_smoothed_and_leaves_evaluations_out():
    clock = Clock()
    bar = ProgressBar(total=100, clock=clock)
    clock.now = 10.0  # the first step: 10 s (warm-up)
    first = bar.eta(1)
    etas = []
    for step in range(11, 61, 10):  # then 1 s a step, with one stretch twice as slow
        clock.now += 10 * (2.0 if step == 31 else 1.0)
        etas.append(bar.eta(step))
    assert first == 990.0
    slow = etas[2]  # after the slow stretch
    assert etas[1] < slow < etas[1] * 1.5  # it moves, but not to the stretch's own pace (2 s a step: 138 s)
    assert all(later < earlier for earlier, later in zip(etas, etas[1:]) if later is not slow)
    clock.now += 300  # an evaluation and its checkpoint at step 60
    bar.restart(60)
    clock.now += 10
    after = bar.eta(70)
    assert after < etas[-1]  # the evaluation's 300 s are not a step's time


def test_a_report_of_236_labels_fits_a_terminal_and_report_txt_keeps_every_label(tmp_path, capsys):
    from side.reports import TERMINAL_LABELS, terminal_table, write_report
    from metrics import format_report
    rows = [{"name": f"C{i:07d}", "precision": (i % 7) / 7, "recall": (i % 5) / 5, "f1": (i % 11) / 11,
             "support": i % 4} for i in range(236)]
    full = format_report(rows)
    shown = terminal_table(rows)
    write_report(str(tmp_path), "test metrics\n\n" + full, "test metrics\n\n" + shown)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) <= TERMINAL_LABELS + 12  # the summary, the weakest labels, the averages
    assert all(line in printed for line in full.splitlines()[-2:])  # macro and weighted averages over all 236
    weakest = [line.split()[0] for line in shown.splitlines()[3:3 + TERMINAL_LABELS]]
    assert all(rows[int(name[1:])]["f1"] == 0 and rows[int(name[1:])]["support"] > 0 for name in weakest)
    saved = (tmp_path / "report.txt").read_text()
    assert all(r["name"] in saved for r in rows)
    assert terminal_table(rows[:TERMINAL_LABELS]) == format_report(rows[:TERMINAL_LABELS])  # a few labels: whole
