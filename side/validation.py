"""What a validation share split off the training file leaves unseen (train.py without --val-file).

check_validation_share   single-label: every class has a validation row, or the run is refused;
    multi-label: labels found only in the validation share, in no training row, are counted in a warning
"""
import collections
import math

from data import DataError
from side.distributed import is_main_rank


def check_validation_share(path, val_fraction, labels, train_rows, val_rows, multi_label):
    """labels: the training file's, a name (single-label) or a list of names (multi-label) per row."""
    if multi_label:
        warn_untrained_labels(path, val_fraction, [labels[i] for i in train_rows], [labels[i] for i in val_rows])
    else:
        check_every_class_validated(path, val_fraction, labels, [labels[i] for i in val_rows])


def check_every_class_validated(path, val_fraction, labels, val_labels):
    """The stratified split takes round(val_fraction x rows) of each class (and leaves one in training): a small
    class gets no validation row, and without any the run could not select a model. Say what is needed."""
    counts, validated = collections.Counter(labels), set(val_labels)
    short = [(name, n) for name, n in sorted(counts.items()) if name not in validated]
    if not short:
        return
    need = max(2, math.ceil(0.5 / val_fraction - 1e-9))  # the fewest rows that round to one validation row
    raise DataError(f"{path}: --val-fraction {val_fraction} holds out no validation row of {len(short)} of "
                    f"{len(counts)} classes: {shown_counts(short)}; a class needs at least {need} rows for one. "
                    "Add rows, give a --val-file, or raise --val-fraction")


def warn_untrained_labels(path, val_fraction, train_labels, val_labels):
    """Multi-label splits are not stratified: a rare label can land wholly in the validation share. The model never
    sees it trained, and every validation row of it is a miss; the run goes on, but says so."""
    trained = {name for row in train_labels for name in row}
    untrained = collections.Counter(name for row in val_labels for name in row if name not in trained)
    if not untrained or not is_main_rank():
        return
    total = len(trained | set(untrained))
    print(f"warning: {path}: {len(untrained)} of {total} labels occur only in the --val-fraction {val_fraction} "
          f"validation share, in no training row: the model cannot learn them, and they count as misses in the "
          f"validation scores ({shown_counts(sorted(untrained.items()))}). Give a --val-file that keeps training "
          "rows of them, or add rows")


def shown_counts(counts, limit=10):
    """"'a' (1 row), 'b' (3 rows), ...": the first `limit` (name, rows) pairs."""
    shown = ", ".join(f"{name!r} ({n} row{'s' * (n > 1)})" for name, n in counts[:limit])
    return shown + ", ..." * (len(counts) > limit)
