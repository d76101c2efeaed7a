"""
The simplest strong baseline: TF-IDF (word 1-2 grams) + logistic regression, on train.py's split of the same
files, scored with our metrics.py. Run it beside `python train.py` on your data before trusting a fine-tune.

    pip install scikit-learn
    python scripts/linear_baseline.py                                    # the shipped medical abstracts
    python scripts/linear_baseline.py --train-file ../shared/data/roco_radiology/train.csv \
        --test-file ../shared/data/roco_radiology/test.csv               # multi-label: one-vs-rest

It trains on the 90% of the training file that train.py trains on (same split, same --seed), tunes nothing
on the test file, and for multi-label data picks one decision threshold on the held-out 10%, as train.py's
default `--threshold global` does. Prints the test metrics and writes them as JSON with --out.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import LabelEncoder, read_table, train_val_split  # noqa: E402
from metrics import compute_metrics, format_table, tune_thresholds  # noqa: E402


def read_split(args):
    """(train, val, test) as (texts, targets) and the label encoder, split exactly as train.py splits."""
    multi = {"auto": None, "single": False, "multi": True}[args.task]
    read = lambda path, m=multi: read_table(path, args.text_column, args.label_column or None, m, args.label_sep)
    table = read(args.train_file)
    labels = LabelEncoder.fit(table.labels, table.multi_label, names=table.label_columns or ())
    rows = lambda t, idx: ([t.texts[i] for i in idx], labels.encode([t.labels[i] for i in idx], t.path))
    if args.val_file:
        val_table = read(args.val_file, table.multi_label)
        train, val = rows(table, range(len(table.texts))), rows(val_table, range(len(val_table.texts)))
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

    (train_x, train_y), (val_x, val_y), (test_x, test_y), labels = read_split(args)
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
        threshold = tune_thresholds(logits(val_x), val_y)
        metrics = compute_metrics(logits(test_x), test_y, True, threshold)
        metrics["threshold"] = threshold
    else:
        model = linear.fit(features, train_y)
        scores = np.full((len(test_x), labels.num_labels), -30.0, np.float32)
        scores[:, model.classes_] = model.decision_function(vectorizer.transform(test_x))
        metrics = compute_metrics(scores, test_y, False)
    return metrics


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-file", default="example_data/medical_abstracts/train.csv")
    p.add_argument("--val-file", default="", help="default: split --val-fraction off the training file")
    p.add_argument("--test-file", default="example_data/medical_abstracts/test.csv")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="", help="default: `label`, else `labels`")
    p.add_argument("--task", default="auto", choices=["auto", "single", "multi"])
    p.add_argument("--label-sep", default=";")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="the split's seed: use train.py's --seed")
    p.add_argument("--C", type=float, default=10.0, help="inverse regularisation strength")
    p.add_argument("--jobs", type=int, default=1, help="processes for one-vs-rest")
    p.add_argument("--out", default="", help="write the test metrics to this JSON file")
    args = p.parse_args(argv)
    metrics = fit_and_score(args)
    print(format_table(metrics))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


if __name__ == "__main__":
    main()
