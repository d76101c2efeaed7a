"""
Can this test set tell two recipes apart? Each run folder labels the test file once; then the test texts are drawn
again with replacement (--samples times) and every system's F1 is recomputed on each draw. The tables give each
system's micro- and macro-F1 with the 95% interval of those draws (what the test set's size alone leaves open), the
spread over its runs (seeds), and its difference from the first system, paired: both are scored on the same draw,
so what the two get right together cancels out. A difference whose interval holds 0 is one this test set cannot
tell.

    python scripts/bootstrap.py --test-file ../shared/data/medical_abstracts/test.csv \
        default=runs/abstracts/seed-0,runs/abstracts/seed-1,runs/abstracts/seed-2 \
        mix=runs/mix/seed-0,runs/mix/seed-1,runs/mix/seed-2

A system of several runs scores the mean of its runs' F1 on each draw. Decisions are the ones predict.py makes
(the top class; multi-label: each label at or over the checkpoint's threshold, after its calibration temperature).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from side import signals  # noqa: E402
signals.quiet_start(__name__)  # from here a Ctrl-C or SIGTERM ends with one line, not a traceback
from data import DataError, LabelEncoder, read_table  # noqa: E402
from metrics import f1_from_counts, sigmoid  # noqa: E402
from predict import Predictor  # noqa: E402
from side import files  # noqa: E402

METRICS = ("micro_f1", "macro_f1")  # single-label micro-F1 is the accuracy


def parse_system(text):
    """NAME=DIR[,DIR...] -> (NAME, [DIR, ...])."""
    name, sep, dirs = text.partition("=")
    runs = [d for d in dirs.split(",") if d]
    if not sep or not name or not runs:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=RUN_DIR[,RUN_DIR...]")
    missing = [d for d in runs if not os.path.isfile(os.path.join(d, "config.json"))]
    if missing:
        raise argparse.ArgumentTypeError(f"{name}: {', '.join(missing)}: no config.json (not a train.py out-dir?)")
    return name, runs


def decisions_and_truth(run_dir, texts, raw_labels, batch_size):
    """[texts, labels] 0/1 decisions of one run and the targets in its label order, both float."""
    predictor = Predictor(run_dir, device="cpu", batch_size=batch_size)
    multi = predictor.model.config.multi_label
    names = LabelEncoder.from_id2label(dict(enumerate(predictor.names)), multi)
    targets = names.encode(raw_labels, run_dir, hint="or compare runs trained on all of its labels")
    logits = predictor.logits(texts)
    if multi:
        return (sigmoid(logits) >= predictor.thresholds).astype(np.float64), targets.astype(np.float64)
    eye = np.eye(len(predictor.names))
    return eye[logits.argmax(axis=1)], eye[targets]


def f1_scores(weights, decided, truth):
    """Micro- and macro-F1 for each row of weights [draws, texts] (how often each text is drawn): from the
    weighted true positives, predictions and targets of each label. A label with none of them scores 0 (sklearn's
    zero_division=0; single-label micro-F1 is the accuracy)."""
    tp, n_pred, n_true = weights @ (decided * truth), weights @ decided, weights @ truth
    return {"micro_f1": f1_from_counts(tp.sum(1), n_pred.sum(1), n_true.sum(1)),
            "macro_f1": f1_from_counts(tp, n_pred, n_true).mean(1)}


def metric_table(scores, metric, reference_name):
    """One metric's rows: each system's score on the test set, its interval over the draws, its spread over runs,
    and its paired difference from the reference system."""
    lines = [f"| system | runs | {metric} | 95% interval over draws | std over runs | difference from "
             f"{reference_name} | its 95% interval | draws where it is <= 0 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    reference = scores[reference_name][metric].mean(0)
    for name, by_metric in scores.items():
        per_run = by_metric[metric]
        mean, diff = per_run.mean(0), per_run.mean(0) - reference
        spread = f"{per_run[:, 0].std(ddof=1):.4f}" if len(per_run) > 1 else "-"
        compared = ("-", "-", "-") if name == reference_name else (
            f"{diff[0]:+.4f}", interval(diff[1:]), f"{(diff[1:] <= 0).mean():.1%}")
        lines.append(f"| {name} | {len(per_run)} | {mean[0]:.4f} | {interval(mean[1:])} | {spread} | "
                     + " | ".join(compared) + " |")
    return "\n".join(lines)


def interval(values):
    low, high = np.percentile(values, [2.5, 97.5])
    return f"{low:.4f} to {high:.4f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("systems", nargs="+", type=parse_system, metavar="NAME=RUN_DIR[,RUN_DIR...]",
                   help="train.py out-dirs; the first system is the one the others are compared with")
    p.add_argument("--test-file", required=True)
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="", help='"" = label, else labels (as train.py)')
    p.add_argument("--label-sep", default=";")
    p.add_argument("--samples", type=int, default=2000, help="test sets drawn with replacement")
    p.add_argument("--seed", type=int, default=0, help="the draws' seed")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="", help="also write the table (markdown) here")
    args = p.parse_args(argv)
    if args.samples < 100:
        p.error(f"--samples {args.samples}: at least 100 draws are needed for a 95% interval")
    names = [name for name, _ in args.systems]
    if len(set(names)) < len(names):
        p.error(f"each system needs a name of its own: {', '.join(sorted({n for n in names if names.count(n) > 1}))}"
                " given twice")
    reads = {"--test-file": args.test_file, **{f"run folder of {name}": run for name, runs in args.systems
                                                for run in runs}}
    if problem := files.out_file_problem(args.out, reads):
        p.error(problem)
    try:
        table = read_table(args.test_file, args.text_column, args.label_column or None, None, args.label_sep)
    except (DataError, OSError) as e:
        raise SystemExit(f"cannot read the test file: {e}") from None
    if table.labels is None:
        raise SystemExit(f"{args.test_file}: no label column (looked for 'label' and 'labels'); name it with "
                         "--label-column")
    n = len(table.texts)
    weights = np.random.default_rng(args.seed).multinomial(n, np.full(n, 1.0 / n), size=args.samples)
    weights = np.vstack([np.ones(n), weights]).astype(np.float64)  # row 0: the test set as it is

    scores = {}  # {system: {metric: [runs, 1 + draws]}}
    for name, runs in args.systems:
        per_run = []
        for run in runs:
            try:
                decided, truth = decisions_and_truth(run, table.texts, table.labels, args.batch_size)
            except (DataError, ValueError) as e:
                raise SystemExit(f"{name}: {e}") from None
            per_run.append(f1_scores(weights, decided, truth))
            print(f"{name}: {run}: test " + ", ".join(f"{k} {v[0]:.4f}" for k, v in per_run[-1].items()),
                  file=sys.stderr, flush=True)
        scores[name] = {metric: np.array([r[metric] for r in per_run]) for metric in METRICS}
    text = "\n\n".join(metric_table(scores, metric, args.systems[0][0]) for metric in METRICS)
    text = f"{n} test texts ({args.test_file}), {args.samples} draws with replacement\n\n" + text
    print(text)
    if args.out:
        try:
            files.write_text(args.out, text + "\n", "the table")
        except files.WriteFailed as e:
            raise SystemExit(str(e)) from None


if __name__ == "__main__":
    with signals.stopping("Run the same command again (nothing was written)"):  # Ctrl-C, SIGTERM, | head
        main()
