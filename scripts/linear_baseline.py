"""
The simplest strong baseline: TF-IDF (word 1-2 grams) + logistic regression, on train.py's split of the same
files, scored with our metrics.py. Run it beside `python train.py` on your data before trusting a fine-tune.

    pip install scikit-learn
    python scripts/linear_baseline.py                                    # the shipped medical abstracts
    python scripts/linear_baseline.py --train-file ../shared/data/roco_radiology/train.csv \
        --test-file ../shared/data/roco_radiology/test.csv               # multi-label: one-vs-rest

It trains on the 90% of the training file that train.py trains on (same split, same --seed), tunes nothing
on the test file, and for multi-label data picks one decision threshold on the held-out 10%, as train.py's
default `--threshold global` does. With --val-fraction 0 (and no --val-file), as train.py then, nothing is held
out: it trains on the whole file and multi-label decisions stay at 0.5. C is fixed (--C), never tuned. Prints the
test metrics and writes them as JSON with --out.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from side import signals  # noqa: E402
signals.quiet_start(__name__)  # from here a Ctrl-C or SIGTERM ends with one line, not a traceback
from data import IGNORE_INDEX, LabelEncoder, read_table, train_val_split  # noqa: E402
from metrics import calibration_metrics, compute_metrics, f1_by_frequency, format_table, tune_thresholds  # noqa: E402
from side import files  # noqa: E402


def read_split(args):
    """(train, val, test) as (texts, targets) and the label encoder, split exactly as train.py splits; val is None
    with --val-fraction 0 (no --val-file): every training row is trained on."""
    multi = {"auto": None, "single": False, "multi": True}[args.task]
    columns = args.label_column.split(",") if "," in args.label_column else (args.label_column or None)
    read = lambda path, m=multi: read_table(path, args.text_column, columns, m, args.label_sep)
    table = read(args.train_file)
    labels = LabelEncoder.fit(table.labels, table.multi_label, names=table.label_columns or ())

    def rows(t, idx):  # as train.py: unknown labels dropped with --unknown-labels ignore, and rows left without one
        targets = labels.encode([t.labels[i] for i in idx], t.path, args.unknown_labels)
        keep = np.ones(len(targets), bool) if labels.multi_label else targets != IGNORE_INDEX
        return [t.texts[i] for i, k in zip(idx, keep) if k], targets[keep]
    if args.val_file:
        val_table = read(args.val_file, table.multi_label)
        train, val = rows(table, range(len(table.texts))), rows(val_table, range(len(val_table.texts)))
    elif args.val_fraction == 0:
        train, val = rows(table, range(len(table.texts))), None
    else:
        train_idx, val_idx = train_val_split(table.labels, args.val_fraction, args.seed,
                                             stratify=not table.multi_label)
        train, val = rows(table, train_idx), rows(table, val_idx)
    test_table = read(args.test_file, table.multi_label)
    return train, val, rows(test_table, range(len(test_table.texts))), labels


def fit_and_score(args):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    (train_x, train_y), val, (test_x, test_y), labels = read_split(args)
    print(held_out_note(len(train_x), val, labels.multi_label))
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    features = vectorizer.fit_transform(train_x)
    linear = LogisticRegression(C=args.C, max_iter=2000)
    if labels.multi_label:  # labels never positive in the training share cannot be fit: their logit stays low
        present = train_y.sum(axis=0) > 0
        model = OneVsRestClassifier(linear, n_jobs=args.jobs).fit(features, train_y[:, present])

        def logits(texts):
            out = np.full((len(texts), labels.num_labels), -30.0, np.float32)
            out[:, present] = model.decision_function(vectorizer.transform(texts))
            return out
        threshold = 0.5 if val is None else tune_thresholds(logits(val[0]), val[1])
        scores = logits(test_x)
        metrics = {**compute_metrics(scores, test_y, True, threshold), "threshold": threshold}
        metrics["by_label_frequency"] = f1_by_frequency(scores, test_y, train_y.sum(axis=0), threshold)
    else:
        model = linear.fit(features, train_y)
        scores = np.full((len(test_x), labels.num_labels), -30.0, np.float32)
        scores[:, model.classes_] = model.decision_function(vectorizer.transform(test_x))
        metrics = compute_metrics(scores, test_y, False)
    return {**metrics, **calibration_metrics(scores, test_y, labels.multi_label)}


def held_out_note(trained, val, multi_label):
    """What the validation share was used for: the line the baseline prints before it fits."""
    if val is not None:
        use = "the decision threshold tuned on them" if multi_label else "not used (C is fixed)"
        return f"linear baseline: {trained} training rows, {len(val[0])} held out for validation: {use}"
    fixed = "; multi-label threshold 0.5, not tuned" if multi_label else ""
    return f"linear baseline: no validation data (--val-fraction 0): trained on all {trained} training rows{fixed}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-file", default="example_data/medical_abstracts/train.csv")
    p.add_argument("--val-file", default="", help="default: split --val-fraction off the training file")
    p.add_argument("--test-file", default="example_data/medical_abstracts/test.csv")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="", help="default: `label`, else `labels`")
    p.add_argument("--task", default="auto", choices=["auto", "single", "multi"])
    p.add_argument("--label-sep", default=";")
    p.add_argument("--unknown-labels", default="error", choices=["error", "ignore"],
                   help="val/test labels unseen in training: error, or ignore them (as train.py's option)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="as train.py's; 0 = none: train on the whole file")
    p.add_argument("--seed", type=int, default=0, help="the split's seed: use train.py's --seed")
    p.add_argument("--C", type=float, default=10.0, help="inverse regularisation strength")
    p.add_argument("--jobs", type=int, default=1, help="processes for one-vs-rest")
    p.add_argument("--out", default="", help="write the test metrics to this JSON file")
    args = p.parse_args(argv)
    reads = {"--train-file": args.train_file, "--val-file": args.val_file, "--test-file": args.test_file}
    if problem := files.out_file_problem(args.out, reads):
        p.error(problem)
    if not 0 <= args.val_fraction < 1:  # as train.py's check: train_val_split would end in a traceback
        p.error(f"--val-fraction {args.val_fraction} must be in [0, 1) (0 = no validation data)")
    metrics = fit_and_score(args)
    print(format_table(metrics))
    if args.out:
        try:
            files.write_json(args.out, metrics, "the metrics")
        except files.WriteFailed as e:
            raise SystemExit(str(e)) from None
    return metrics


if __name__ == "__main__":
    with signals.stopping("Run the same command again (nothing was written)"):  # Ctrl-C, SIGTERM, | head
        main()
