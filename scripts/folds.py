"""K-fold cross-validation files for scripts/seeds.py --folds: the training file's rows cut into K folds, stratified
by label (single-label: scikit-learn's StratifiedKFold; multi-label: iterative stratification, from the
iterative-stratification package), and for each fold k a training file of the other folds' rows and a test file
of fold k's, in <out-dir>/folds/fold-k/{train,test}.jsonl.

The rows are written as the training file holds them (every column, as read), so the job's column options work
on them unchanged; the job is told the task (single or multi) the whole file has, which a fold alone might not
show. folds.json records the file (size and sha256), K and the seed: a second run reuses the files, and refuses
folds made from other data.
"""
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import DataError, _read_utf8, _records, csv_rows, file_format, jsonl_rows, read_table  # noqa: E402
from side import files  # noqa: E402
from side.checkpoints import file_fingerprint  # noqa: E402


def training_table(cfg):
    """The job's training file read as train.py reads it (its labels decide single- or multi-label)."""
    columns = cfg.label_column.split(",") if "," in cfg.label_column else (cfg.label_column or None)
    multi = {"auto": None, "single": False, "multi": True, "mlm": None}[cfg.task]
    return read_table(cfg.train_file, cfg.text_column, columns, multi, cfg.label_sep, cfg.text_pair_column or None)


def raw_records(path):
    """Every data row of a .csv/.tsv/.jsonl file (optionally .gz) as a dict, in read_table's order."""
    delimiter, compressed = file_format(path)
    text = _read_utf8(Path(path), compressed)
    if delimiter == "lines":
        raise DataError(f"{path}: a .txt file has no labels to cross-validate")
    rows = jsonl_rows(text.splitlines()) if delimiter is None else csv_rows(path, io.StringIO(text, newline=""),
                                                                           delimiter)[1]
    return [record for _, record in _records(path, rows)[0]]


def fold_indices(labels, multi_label, k, seed):
    """[(training rows, held-out rows)] for each of k folds, stratified by label."""
    if k < 2 or k > len(labels):
        raise SystemExit(f"--folds {k}: give 2 or more, and at most the {len(labels)} rows of the training file")
    placeholder = np.zeros((len(labels), 1))
    if not multi_label:
        from sklearn.model_selection import StratifiedKFold
        counts = {name: labels.count(name) for name in set(labels)}
        rare = sorted(name for name, n in counts.items() if n < k)
        if rare:
            print(f"note: {len(rare)} label(s) have fewer than {k} rows ({', '.join(rare[:5])}"
                  f"{', ...' if len(rare) > 5 else ''}): some folds test none of them")
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(splitter.split(placeholder, labels))
    try:
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
    except ImportError:
        raise SystemExit("--folds on multi-label data stratifies with iterative-stratification: "
                         "pip install iterative-stratification") from None
    names = sorted({name for row in labels for name in row})
    column = {name: i for i, name in enumerate(names)}
    multi_hot = np.zeros((len(labels), len(names)), np.int8)
    for i, row in enumerate(labels):
        multi_hot[i, [column[name] for name in row]] = 1
    splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(placeholder, multi_hot))


def write_jsonl(path, records):
    # through the one writer: a kill leaves no half file for a later run to reuse
    files.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "a fold")


def write_folds(cfg, k, seed, out_dir):
    """[(train path, test path)] of each fold, written once into out_dir/folds; the task of the whole file."""
    table = training_table(cfg)
    if table.labels is None:
        raise SystemExit(f"--folds: {cfg.train_file} has no label column (looked for 'label' and 'labels'); name it "
                         "with --label-column")
    folder = os.path.join(out_dir, "folds")
    made = {"train_file": os.path.abspath(cfg.train_file), **file_fingerprint(cfg.train_file), "folds": k,
            "seed": seed, "text_column": cfg.text_column, "label_column": cfg.label_column}
    paths = [(os.path.join(folder, f"fold-{i}", "train.jsonl"), os.path.join(folder, f"fold-{i}", "test.jsonl"))
             for i in range(k)]
    stamp = os.path.join(folder, "folds.json")
    if os.path.isfile(stamp):
        before = json.load(open(stamp))
        if before != made:
            raise SystemExit(f"{folder} holds folds of other data or another --folds/--fold-seed ({before}): "
                             "pass another --out-dir")
        return paths, table.multi_label
    records = raw_records(cfg.train_file)
    for (train_path, test_path), (train_rows, test_rows) in zip(paths, fold_indices(table.labels, table.multi_label,
                                                                                 k, seed)):
        os.makedirs(os.path.dirname(train_path), exist_ok=True)
        write_jsonl(train_path, [records[i] for i in train_rows])
        write_jsonl(test_path, [records[i] for i in test_rows])
    # the stamp goes last: folds without it (a kill while writing them) are written again
    files.write_json(stamp, made, "the folds' stamp")
    return paths, table.multi_label
