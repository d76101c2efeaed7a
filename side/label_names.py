"""predict.py --label-names FILE: a name for each label code (a UMLS CUI means nothing to a reader), in the output
beside the code and on the --explain-html page.

read_label_names(path, codes) -> {code: name} from a CSV of code,name rows (a header row code,name is optional)
with_names(predictions, names) -> predictions whose labels carry their "name" too
"""
import csv

import numpy as np

from data import DataError


def read_label_names(path, codes):
    """{code: name} of the file's rows. A row that is not two fields, a code given twice, or a file that names
    none of the checkpoint's codes is a DataError naming the line; a code the file lacks is shown as it is."""
    names = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.reader(f), 1):
                if line == 1 and [x.strip().lower() for x in row] == ["code", "name"]:
                    continue
                if len(row) != 2 or not row[0].strip():
                    raise DataError(f"--label-names {path}: line {line}: expected two fields, code,name; got {row}")
                code, name = row[0].strip(), row[1].strip()
                if code in names:
                    raise DataError(f"--label-names {path}: line {line}: {code!r} is named twice")
                names[code] = name
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--label-names {path}: cannot read it ({e})") from None
    if codes is not None and not set(names) & set(codes):
        raise DataError(f"--label-names {path}: none of its {len(names)} codes is a label of the checkpoint "
                        f"(such as {', '.join(list(codes)[:3])})")
    return names


def with_names(predictions, names):
    """Each predicted label (single-label: the prediction; multi-label: each of its "labels") with its "name",
    right after its code; predictions as they are without names."""
    if not names:
        return predictions
    for p in predictions:
        for x in p["labels"] if "labels" in p else [p]:
            named = {"label": x["label"], "name": names.get(x["label"], x["label"])}
            rest = {k: v for k, v in x.items() if k != "label"}
            x.clear()
            x.update({**named, **rest})
    return predictions


def gold_labels(targets, codes, names=None):
    """Each text's true labels as the page shows them ({"label"[, "name"]}), from LabelEncoder targets: a class id
    per text (single-label) or multi-hot rows."""
    rows = [[int(t)] if np.ndim(t) == 0 else np.flatnonzero(np.asarray(t) > 0.5).tolist() for t in targets]
    return [[{"label": codes[j], **({"name": names.get(codes[j], codes[j])} if names else {})} for j in row]
            for row in rows]
