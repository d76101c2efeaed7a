"""Classification metrics for multi-class and multi-label fine-tuning, in plain numpy.

Numbers agree with scikit-learn (zero_division=0) to floating-point precision;
tests/test_metrics.py checks every metric against it. Conventions:
- Multi-class scores cover all C classes (sklearn's labels=range(C)), so a class
  that is neither in the targets nor predicted counts as 0 in macro averages.
- Multi-label: a label is predicted when sigmoid(logit) >= threshold; a target
  entry is positive when > 0.5. Labels with no positives and no predictions get
  precision = recall = F1 = 0, as in sklearn.
- ROC-AUC is undefined for a class/label without both positives and negatives,
  average precision for one without positives. Macro averages skip those
  (sklearn raises or warns instead) and are nan when none is defined.
- Calibration (calibration_metrics): expected calibration error over 15 equal-width bins (Guo et al. 2017) and
  the Brier score. Single-label: top-label ECE (the top class's probability against whether it was right) and
  the multi-class Brier score (sum over classes, as Brier 1950 and sklearn's brier_score_loss for several
  classes). Multi-label: every label decision, each label's probability against its presence, for both.
- f1_by_frequency: multi-label micro- and macro-F1 of the labels grouped by how often they occur in the
  training data (FREQUENCY_EDGES).
Inputs are numpy arrays (or CPU tensors, which np.asarray accepts).
"""
import numpy as np

_GRID = np.arange(1, 100) / 100.0  # threshold candidates 0.01..0.99; holds 0.5 exactly
_HALF = int(np.flatnonzero(_GRID == 0.5)[0])
_MIN_GAIN = 1e-12  # tuning moves only for gains above float noise, so F1 can never drop


def softmax(logits):
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))  # shifted so exp cannot overflow
    return z / z.sum(axis=-1, keepdims=True)


def sigmoid(logits):
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(-np.abs(x))  # exp of a non-positive number cannot overflow
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _multiclass_inputs(logits, targets):
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets).astype(np.int64).reshape(-1)
    if logits.ndim != 2 or len(logits) != len(targets) or len(targets) == 0:
        raise ValueError(f"need logits [N, C] and targets [N] with N > 0, got {logits.shape} and {targets.shape}")
    if targets.min() < 0 or targets.max() >= logits.shape[1]:
        raise ValueError(f"targets must lie in [0, {logits.shape[1]})")
    return logits, targets


def _multilabel_inputs(logits, targets):
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets) > 0.5  # also accepts float or smoothed multi-hot targets
    if logits.ndim != 2 or logits.shape != targets.shape or len(logits) == 0:
        raise ValueError(f"need logits and targets of one shape [N, L], N > 0: {logits.shape}, {targets.shape}")
    return logits, targets


def _predict_multilabel(logits, threshold):
    threshold = np.asarray(threshold, dtype=np.float64)
    if threshold.ndim > 1 or (threshold.ndim == 1 and threshold.shape != (logits.shape[1],)):
        raise ValueError(f"threshold must be a scalar or have one value per label ({logits.shape[1]})")
    probs = sigmoid(logits)
    return probs, probs >= threshold


def _divide(num, den):
    """num / den, and 0 where den == 0 (sklearn's zero_division=0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def f1_from_counts(tp, n_pred, n_true):
    """F1 from true positives, predictions and targets, elementwise (any shape: per class, per draw)."""
    return _divide(2 * tp, n_true + n_pred)  # sklearn's form: exact for empty classes, no P*R rounding


def _prf(tp, n_pred, n_true):
    """Precision, recall and F1 from counts, elementwise."""
    return _divide(tp, n_pred), _divide(tp, n_true), f1_from_counts(tp, n_pred, n_true)


def _averaged_prf(tp, n_pred, n_true, weighted):
    """Micro, macro and (optionally) support-weighted precision/recall/F1 from per-class counts."""
    names = ("precision", "recall", "f1")
    per_class = _prf(tp, n_pred, n_true)
    out = {f"micro_{k}": float(v) for k, v in zip(names, _prf(tp.sum(), n_pred.sum(), n_true.sum()))}
    out.update({f"macro_{k}": float(v.mean()) for k, v in zip(names, per_class)})
    if weighted:
        out.update({f"weighted_{k}": float(np.sum(v * n_true) / n_true.sum()) for k, v in zip(names, per_class)})
    return out


def _ranking_scores(y, score):
    """Binary ROC-AUC and average precision (nan where undefined), following sklearn's curves."""
    order = np.argsort(score, kind="stable")[::-1]
    y, score = y[order], score[order]
    # One curve point per distinct score: tied samples enter the prediction together.
    cut = np.r_[np.flatnonzero(np.diff(score)), len(y) - 1]
    tps = np.cumsum(y)[cut]
    fps = cut + 1 - tps
    n_pos, n_neg = tps[-1], fps[-1]
    # Trapezoids under the ROC curve, kept in integer counts until the last division.
    tp0, fp0 = np.r_[0, tps], np.r_[0, fps]
    auc = np.sum(np.diff(fp0) * (tp0[1:] + tp0[:-1])) / (2.0 * n_pos * n_neg) if n_pos and n_neg else np.nan
    # Step-wise (not interpolated) AP: precision at each cut, weighted by the recall it adds.
    ap = np.sum(np.diff(tp0) * (tps / (tps + fps))) / n_pos if n_pos else np.nan
    return auc, ap


def _ranking_metrics(y, probs):
    """Macro (over defined columns) and micro (flattened) ROC-AUC and AP of [N, K] indicators."""
    per_column = np.array([_ranking_scores(y[:, k], probs[:, k]) for k in range(y.shape[1])])
    micro = _ranking_scores(y.ravel(), probs.ravel())
    out = {}
    for i, name in enumerate(("roc_auc", "average_precision")):
        defined = per_column[~np.isnan(per_column[:, i]), i]
        out[f"macro_{name}"] = float(defined.mean()) if defined.size else float("nan")
        out[f"micro_{name}"] = float(micro[i])
    return out


def confusion_matrix(preds, targets, num_classes):
    """[C, C] int counts; rows are true classes, columns predicted ones (sklearn's layout)."""
    preds = np.asarray(preds).astype(np.int64).reshape(-1)
    targets = np.asarray(targets).astype(np.int64).reshape(-1)
    both = np.r_[preds, targets]
    if preds.shape != targets.shape or both.size and (both.min() < 0 or both.max() >= num_classes):
        raise ValueError(f"preds and targets must have the same length and lie in [0, {num_classes})")
    counts = np.bincount(targets * num_classes + preds, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def multiclass_metrics(logits, targets, top_k=(3, 5)):
    """Scores of argmax predictions, top-k accuracy for each k < C, and one-vs-rest ranking scores."""
    logits, targets = _multiclass_inputs(logits, targets)
    n_classes = logits.shape[1]
    preds = logits.argmax(axis=1)
    cm = confusion_matrix(preds, targets, n_classes)
    out = {"accuracy": float(np.mean(preds == targets))}
    out.update(_averaged_prf(np.diag(cm), cm.sum(axis=0), cm.sum(axis=1), weighted=True))
    # sklearn's tie order: a stable ascending sort reversed, so among equal logits the higher class ranks first.
    ranked = np.argsort(logits, axis=1, kind="stable")[:, ::-1]
    for k in top_k:
        if k < 1:
            raise ValueError(f"top_k values must be >= 1, got {k}")
        if k < n_classes:  # k >= C would be a meaningless 1.0
            out[f"top{k}_accuracy"] = float(np.mean(np.any(ranked[:, :k] == targets[:, None], axis=1)))
    out.update(_ranking_metrics(targets[:, None] == np.arange(n_classes), softmax(logits)))
    return out


def multilabel_metrics(logits, targets, threshold=0.5):
    """Scores of sigmoid(logits) >= threshold (scalar or one per label), and ranking scores of the sigmoids."""
    logits, targets = _multilabel_inputs(logits, targets)
    probs, preds = _predict_multilabel(logits, threshold)
    out = _averaged_prf((preds & targets).sum(axis=0), preds.sum(axis=0), targets.sum(axis=0), weighted=False)
    out["exact_match"] = float(np.mean(np.all(preds == targets, axis=1)))
    out["hamming_loss"] = float(np.mean(preds != targets))
    out["label_accuracy"] = 1.0 - out["hamming_loss"]
    out.update(_ranking_metrics(targets, probs))
    return out


def compute_metrics(logits, targets, multi_label, threshold=0.5):
    if multi_label:
        return multilabel_metrics(logits, targets, threshold)
    return multiclass_metrics(logits, targets)


def per_class_report(logits, targets, multi_label, label_names=None, threshold=0.5):
    """One row per class/label: name, precision, recall, f1, support (number of true positives in targets)."""
    if multi_label:
        logits, targets = _multilabel_inputs(logits, targets)
        preds = _predict_multilabel(logits, threshold)[1]
        tp, n_pred, n_true = (preds & targets).sum(axis=0), preds.sum(axis=0), targets.sum(axis=0)
    else:
        logits, targets = _multiclass_inputs(logits, targets)
        cm = confusion_matrix(logits.argmax(axis=1), targets, logits.shape[1])
        tp, n_pred, n_true = np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)
    names = [str(i) for i in range(len(tp))] if label_names is None else [str(n) for n in label_names]
    if len(names) != len(tp):
        raise ValueError(f"got {len(names)} label names for {len(tp)} classes")
    return [{"name": n, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for n, p, r, f, s in zip(names, *_prf(tp, n_pred, n_true), n_true)]


def _f1_table(probs, targets):
    """F1 inputs for every label l and grid threshold j: tp[l, j], n_pred[l, j], n_true[l, 1]."""
    n_labels, n_bins = probs.shape[1], len(_GRID) + 1
    # A probability in bin b clears exactly the thresholds _GRID[:b]; one bincount then serves every threshold.
    bins = np.searchsorted(_GRID, probs, side="right") + n_bins * np.arange(n_labels)

    def predicted_at_each_threshold(flat_bins):
        hist = np.bincount(flat_bins, minlength=n_labels * n_bins).reshape(n_labels, n_bins)
        return np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    tp, n_pred = predicted_at_each_threshold(bins[targets]), predicted_at_each_threshold(bins.ravel())
    return tp, n_pred, targets.sum(axis=0)[:, None]


def tune_thresholds(logits, targets, per_label=False, average="micro"):
    """Thresholds from a 0.01 grid that maximise micro or macro F1 on validation data.

    Starts at 0.5 and moves only on a gain above _MIN_GAIN, so validation F1 never falls
    below that at 0.5; among equal gains the lowest threshold wins. Returns a float, or one threshold per
    label (an array) when per_label, tuned from the best global threshold.
    """
    if average not in ("micro", "macro"):
        raise ValueError(f"average must be 'micro' or 'macro', got {average!r}")
    logits, targets = _multilabel_inputs(logits, targets)
    tp, n_pred, n_true = _f1_table(sigmoid(logits), targets)
    f1 = f1_from_counts(tp, n_pred, n_true)
    if average == "macro":
        score = f1.mean(axis=0)
    else:
        score = f1_from_counts(tp.sum(axis=0), n_pred.sum(axis=0), n_true.sum())
    best = int(score.argmax()) if score.max() > score[_HALF] + _MIN_GAIN else _HALF
    if not per_label:
        return float(_GRID[best])
    labels = np.arange(tp.shape[0])
    choice = np.full(len(labels), best)
    if average == "macro":  # macro F1 is a mean of per-label F1s, so each label is tuned on its own
        top = f1.argmax(axis=1)
        choice = np.where(f1[labels, top] > f1[:, best] + _MIN_GAIN, top, best)
        return _GRID[choice]
    # Micro F1 couples the labels: coordinate ascent, one label at a time with the others' counts fixed.
    total_tp, total_pred, total_true = tp[labels, choice].sum(), n_pred[labels, choice].sum(), n_true.sum()
    for _ in range(100):  # every move strictly raises F1, so this ends; the cap only bounds run time
        moved = False
        for i in labels:
            rest_tp, rest_pred = total_tp - tp[i, choice[i]], total_pred - n_pred[i, choice[i]]
            candidate = f1_from_counts(rest_tp + tp[i], rest_pred + n_pred[i], total_true)
            if candidate.max() > candidate[choice[i]] + _MIN_GAIN:
                choice[i] = candidate.argmax()
                total_tp, total_pred = rest_tp + tp[i, choice[i]], rest_pred + n_pred[i, choice[i]]
                moved = True
        if not moved:
            break
    return _GRID[choice]


# ----------------------------------------------------------------------------- calibration

CALIBRATION_BINS = 15


def calibration_inputs(logits, targets, multi_label):
    """(confidence, outcome) pairs, one per decision. Single-label: the top class's probability and 1 where it was
    the true class (top-label). Multi-label: every label decision's probability and 1 where the label is there."""
    if multi_label:
        logits, targets = _multilabel_inputs(logits, targets)
        return sigmoid(logits).ravel(), targets.ravel().astype(np.float64)
    logits, targets = _multiclass_inputs(logits, targets)
    probs = softmax(logits)
    return probs.max(axis=1), (probs.argmax(axis=1) == targets).astype(np.float64)


def reliability_bins(confidence, outcome, n_bins=CALIBRATION_BINS):
    """Per equal-width bin of confidence, (lo, hi] with 0 in the first: (count, mean confidence, observed
    frequency of the outcome); 0 for an empty bin. What a reliability diagram draws."""
    confidence, outcome = np.asarray(confidence, np.float64), np.asarray(outcome, np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    mean = lambda values: _divide(np.bincount(bins, values, minlength=n_bins), count)
    return count, mean(confidence), mean(outcome)


def expected_calibration_error(confidence, outcome, n_bins=CALIBRATION_BINS):
    """The bins' gaps |observed frequency - mean confidence|, weighted by their share of the decisions."""
    count, mean_confidence, frequency = reliability_bins(confidence, outcome, n_bins)
    return float(np.sum(count * np.abs(frequency - mean_confidence)) / count.sum())


def brier_score(logits, targets, multi_label):
    """Mean squared distance of the probabilities from the one-hot (single-label: summed over classes) or
    multi-hot (multi-label: per label decision) targets."""
    if multi_label:
        logits, targets = _multilabel_inputs(logits, targets)
        return float(np.mean((sigmoid(logits) - targets) ** 2))
    logits, targets = _multiclass_inputs(logits, targets)
    one_hot = targets[:, None] == np.arange(logits.shape[1])
    return float(np.mean(np.sum((softmax(logits) - one_hot) ** 2, axis=1)))


def calibration_metrics(logits, targets, multi_label):
    return {"ece": expected_calibration_error(*calibration_inputs(logits, targets, multi_label)),
            "brier": brier_score(logits, targets, multi_label)}


# ----------------------------------------------------------------------------- rare and frequent labels

# a label's bucket by its count of training texts: 0 (only in validation or test data), 1-10, 11-50, 51-200, >200
FREQUENCY_EDGES = (10, 50, 200)


def frequency_buckets(train_counts, edges=FREQUENCY_EDGES):
    """Bucket name -> the indices of the labels whose training count falls in it, in order; empty ones left out."""
    counts = np.asarray(train_counts)
    lows, highs = [0, 1, *(e + 1 for e in edges)], [0, *edges, np.inf]
    buckets = {}
    for lo, hi in zip(lows, highs):
        name = str(lo) if lo == hi else f">{lo - 1}" if hi == np.inf else f"{lo}-{hi}"
        members = np.flatnonzero((counts >= lo) & (counts <= hi))
        if members.size:
            buckets[name] = members
    return buckets


def f1_by_frequency(logits, targets, train_counts, threshold=0.5, edges=FREQUENCY_EDGES):
    """Multi-label: per training-count bucket, its number of labels, their positives in `targets`, and the
    micro-F1 (pooled counts) and macro-F1 (mean of per-label F1s, 0 for a label never present nor predicted)
    of its labels alone."""
    logits, targets = _multilabel_inputs(logits, targets)
    preds = _predict_multilabel(logits, threshold)[1]
    tp, n_pred, n_true = (preds & targets).sum(axis=0), preds.sum(axis=0), targets.sum(axis=0)
    return {name: {"labels": int(idx.size), "support": int(n_true[idx].sum()),
                   "micro_f1": float(f1_from_counts(tp[idx].sum(), n_pred[idx].sum(), n_true[idx].sum())),
                   "macro_f1": float(f1_from_counts(tp[idx], n_pred[idx], n_true[idx]).mean())}
            for name, idx in frequency_buckets(train_counts, edges).items()}


def format_frequency_table(buckets):
    """f1_by_frequency's buckets as aligned rows."""
    header = f"{'training texts':<15}{'labels':>8}{'support':>9}{'micro_f1':>10}{'macro_f1':>10}"
    return "\n".join([header] + [f"{name:<15}{b['labels']:>8}{b['support']:>9}{b['micro_f1']:>10.4f}"
                                  f"{b['macro_f1']:>10.4f}" for name, b in buckets.items()])


def _fmt(value):
    return str(int(value)) if isinstance(value, (int, np.integer)) else f"{float(value):.4f}"


def format_table(metrics):
    """Two aligned columns, name and value, for the scalar numbers in `metrics`."""
    rows = [(k, _fmt(v)) for k, v in metrics.items()
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)]
    if not rows:
        return ""
    name_w, value_w = max(len(k) for k, _ in rows), max(len(v) for _, v in rows)
    return "\n".join(f"{k:<{name_w}}  {v:>{value_w}}" for k, v in rows)


_REPORT_COLUMNS = ("precision", "recall", "f1")


def _average_row(name, rows, weights):
    weights = np.asarray(weights, dtype=np.float64)
    means = {k: float(_divide(weights @ [r[k] for r in rows], weights.sum())) for k in _REPORT_COLUMNS}
    return {"name": name, **means, "support": sum(r["support"] for r in rows)}


def format_report(rows):
    """Per-class rows as aligned columns like sklearn's classification_report, then macro and weighted averages."""
    width = max(len(r["name"]) for r in rows + [{"name": "weighted avg"}])

    def line(r):
        numbers = "".join(f"{r[k]:>11.4f}" for k in _REPORT_COLUMNS)
        return f"{r['name']:<{width}}{numbers}{r['support']:>10}"

    header = f"{'':<{width}}{'precision':>11}{'recall':>11}{'f1-score':>11}{'support':>10}"
    if not rows:
        return header
    summary = [_average_row("macro avg", rows, [1] * len(rows)),
               _average_row("weighted avg", rows, [r["support"] for r in rows])]
    return "\n".join([header, "", *map(line, rows), "", *map(line, summary)])
