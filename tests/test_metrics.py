"""metrics.py against scikit-learn on many random cases, plus threshold tuning and table formatting."""
import numpy as np
import pytest

import metrics

TOL = 1e-12
SEEDS = range(30)


def sklearn_metrics():
    return pytest.importorskip("sklearn.metrics")


def assert_close(ours, ref, what=""):
    if np.isnan(ref):
        assert np.isnan(ours), what
    else:
        assert abs(ours - ref) <= TOL, f"{what}: {ours!r} != {ref!r}"


def multiclass_case(seed):
    """Random N, C; some classes absent, sometimes one class only; ties in some logits."""
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 60)), int(rng.integers(2, 9))
    present = rng.choice(c, size=int(rng.integers(1, c + 1)), replace=False)
    if seed % 5 == 0:
        present = present[:1]
    targets = rng.choice(present, size=n)
    logits = rng.normal(size=(n, c)) * rng.uniform(0.1, 5.0)
    if seed % 5 == 1:
        logits = rng.integers(-2, 3, size=(n, c)).astype(np.float64)  # many ties
    elif seed % 5 == 2:
        logits = np.zeros((n, c))  # every score tied
    elif seed % 5 == 3:
        logits[np.arange(n), targets] += 2.0  # a mostly-right model
    return logits, targets


def multilabel_case(seed):
    """Random N, L; labels never / always positive, all-negative predictions, ties, float or int targets."""
    rng = np.random.default_rng(1000 + seed)
    n, n_labels = int(rng.integers(1, 50)), int(rng.integers(1, 9))
    rate = rng.uniform(size=n_labels)
    rate[rng.random(n_labels) < 0.25] = 0.0
    rate[rng.random(n_labels) < 0.1] = 1.0
    targets = rng.random((n, n_labels)) < rate
    logits = rng.normal(size=(n, n_labels)) * rng.uniform(0.1, 4.0) + 1.5 * targets
    if seed % 4 == 1:
        logits = rng.integers(-2, 3, size=(n, n_labels)).astype(np.float64)  # ties, some exactly at p = 0.5
    elif seed % 4 == 2:
        logits = logits - 20.0  # nothing predicted
    threshold = [0.5, rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.95, size=n_labels)][seed % 3]
    targets = targets.astype(np.float32 if seed % 2 else np.int64)
    return logits, targets, threshold


def sklearn_prf(y, preds, average):
    """sklearn's multi-label precision/recall/F1/support; it reads one column as binary, so name the label."""
    prfs = sklearn_metrics().precision_recall_fscore_support
    if y.shape[1] == 1:
        return prfs(y[:, 0], preds[:, 0], labels=[1], average=average, zero_division=0)
    return prfs(y, preds, average=average, zero_division=0)


def sklearn_ranking(y, probs):
    """Reference macro/micro ROC-AUC and AP: sklearn's binary scores, macro over defined columns."""
    skm = sklearn_metrics()
    auc, ap = skm.roc_auc_score, skm.average_precision_score
    both = [k for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]
    positive = [k for k in range(y.shape[1]) if y[:, k].sum() > 0]
    flat_y, flat_p = y.ravel(), probs.ravel()
    return {
        "macro_roc_auc": np.mean([auc(y[:, k], probs[:, k]) for k in both]) if both else np.nan,
        "macro_average_precision": np.mean([ap(y[:, k], probs[:, k]) for k in positive]) if positive else np.nan,
        "micro_roc_auc": auc(flat_y, flat_p) if 0 < flat_y.sum() < len(flat_y) else np.nan,
        "micro_average_precision": ap(flat_y, flat_p) if flat_y.sum() > 0 else np.nan,
    }


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_matches_sklearn(seed):
    skm = sklearn_metrics()
    logits, targets = multiclass_case(seed)
    c = logits.shape[1]
    ours = metrics.multiclass_metrics(logits, targets, top_k=(1, 2, 3, 5))
    preds, labels = logits.argmax(axis=1), list(range(c))
    ref = {"accuracy": skm.accuracy_score(targets, preds)}
    prfs = skm.precision_recall_fscore_support
    for avg in ("micro", "macro", "weighted"):
        p, r, f, _ = prfs(targets, preds, labels=labels, average=avg, zero_division=0)
        ref.update({f"{avg}_precision": p, f"{avg}_recall": r, f"{avg}_f1": f})
    for k in (1, 2, 3, 5):
        if k < c and c > 2:  # sklearn treats 2 classes as binary and rejects 2-column scores
            ref[f"top{k}_accuracy"] = skm.top_k_accuracy_score(targets, logits, k=k, labels=labels)
    one_hot = (targets[:, None] == np.arange(c)).astype(int)
    ref.update(sklearn_ranking(one_hot, metrics.softmax(logits)))
    assert {f"top{k}_accuracy" for k in (1, 2, 3, 5) if k < c} <= set(ours)
    assert not {f"top{k}_accuracy" for k in (1, 2, 3, 5) if k >= c} & set(ours)
    for key, value in ref.items():
        assert type(ours[key]) is float
        assert_close(ours[key], value, key)
    cm = skm.confusion_matrix(targets, preds, labels=labels)
    assert np.array_equal(metrics.confusion_matrix(preds, targets, c), cm)
    p, r, f, s = prfs(targets, preds, labels=labels, average=None, zero_division=0)
    rows = metrics.per_class_report(logits, targets, False, [f"c{i}" for i in labels])
    assert [row["name"] for row in rows] == [f"c{i}" for i in labels]
    for row, *expected in zip(rows, p, r, f, s):
        for key, value in zip(("precision", "recall", "f1", "support"), expected):
            assert_close(row[key], value, key)


@pytest.mark.parametrize("seed", range(6))
def test_multiclass_ranking_matches_sklearn_multiclass_api(seed):
    """With every class present, sklearn's own one-vs-rest averaging gives the same numbers."""
    skm = sklearn_metrics()
    rng = np.random.default_rng(seed)
    c = int(rng.integers(3, 7))
    targets = np.r_[np.arange(c), rng.integers(0, c, size=40)]
    logits = rng.normal(size=(len(targets), c)) + (seed % 2) * np.eye(c)[targets]
    probs, ours = metrics.softmax(logits), metrics.multiclass_metrics(logits, targets)
    assert_close(ours["macro_roc_auc"], skm.roc_auc_score(targets, probs, multi_class="ovr", average="macro"))
    assert_close(ours["micro_roc_auc"], skm.roc_auc_score(targets, probs, multi_class="ovr", average="micro"))
    assert_close(ours["macro_average_precision"], skm.average_precision_score(targets, probs, average="macro"))


@pytest.mark.parametrize("seed", SEEDS)
def test_multilabel_matches_sklearn(seed):
    skm = sklearn_metrics()
    logits, targets, threshold = multilabel_case(seed)
    ours = metrics.multilabel_metrics(logits, targets, threshold)
    y = (targets > 0.5).astype(int)
    preds = (metrics.sigmoid(logits) >= threshold).astype(int)
    ref = {"exact_match": skm.accuracy_score(y, preds), "hamming_loss": skm.hamming_loss(y, preds),
           "label_accuracy": 1.0 - skm.hamming_loss(y, preds)}
    for avg in ("micro", "macro"):
        p, r, f, _ = sklearn_prf(y, preds, avg)
        ref.update({f"{avg}_precision": p, f"{avg}_recall": r, f"{avg}_f1": f})
    ref.update(sklearn_ranking(y, metrics.sigmoid(logits)))
    assert set(ours) == set(ref)
    for key, value in ref.items():
        assert type(ours[key]) is float
        assert_close(ours[key], value, key)
    if all(0 < y[:, k].sum() < len(y) for k in range(y.shape[1])):  # sklearn's own averaging is then defined
        for avg in ("macro", "micro"):
            assert_close(ours[f"{avg}_roc_auc"], skm.roc_auc_score(y, metrics.sigmoid(logits), average=avg))
            assert_close(ours[f"{avg}_average_precision"],
                         skm.average_precision_score(y, metrics.sigmoid(logits), average=avg))
    p, r, f, s = sklearn_prf(y, preds, None)
    rows = metrics.per_class_report(logits, targets, True, None, threshold)
    assert [row["name"] for row in rows] == [str(i) for i in range(y.shape[1])]
    for row, *expected in zip(rows, p, r, f, s):
        for key, value in zip(("precision", "recall", "f1", "support"), expected):
            assert_close(row[key], value, key)


def test_softmax_and_sigmoid_are_stable_and_match_scipy():
    special = pytest.importorskip("scipy.special")
    x = np.random.default_rng(0).normal(size=(50, 7)) * 30
    x[0] = [1000.0, -1000.0, 0.0, 800.0, -800.0, 745.0, -745.0]
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # harmless underflow only
        probs, sig = metrics.softmax(x), metrics.sigmoid(x)
    assert np.allclose(probs, special.softmax(x, axis=1), rtol=0, atol=TOL)
    assert np.allclose(sig, special.expit(x), rtol=1e-14, atol=1e-300)
    assert np.allclose(probs.sum(axis=1), 1.0, rtol=0, atol=TOL) and np.all(np.isfinite(sig))


def test_undefined_ranking_metrics_are_skipped_or_nan():
    logits = np.array([[0.3, -1.0], [2.0, 0.1], [-0.5, 0.4]])
    # Label 0 always positive, label 1 never: no per-label ROC-AUC, AP only for label 0 (where it is 1).
    out = metrics.multilabel_metrics(logits, np.array([[1, 0], [1, 0], [1, 0]]))
    assert np.isnan(out["macro_roc_auc"]) and np.isfinite(out["micro_roc_auc"])
    assert out["macro_average_precision"] == 1.0
    out = metrics.multilabel_metrics(logits, np.zeros((3, 2)))
    assert np.isnan(out["macro_average_precision"]) and np.isnan(out["micro_average_precision"])
    assert np.isnan(out["macro_roc_auc"]) and np.isnan(out["micro_roc_auc"])
    assert out["macro_f1"] == 0.0 and out["micro_f1"] == 0.0 and out["exact_match"] == 0.0
    single = metrics.multiclass_metrics(logits, np.array([1, 1, 1]))  # one class present: its AUC undefined too
    assert np.isnan(single["macro_roc_auc"]) and np.isfinite(single["micro_roc_auc"])


def test_top_k_and_input_checks():
    logits, targets = np.eye(4)[[0, 1, 2, 3, 0]], np.array([0, 1, 2, 3, 1])
    out = metrics.multiclass_metrics(logits, targets, top_k=(2, 3, 4, 10))
    assert "top2_accuracy" in out and "top3_accuracy" in out
    assert "top4_accuracy" not in out and "top10_accuracy" not in out
    with pytest.raises(ValueError):
        metrics.multiclass_metrics(logits, targets, top_k=(0,))
    with pytest.raises(ValueError):
        metrics.multiclass_metrics(logits, np.array([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError):
        metrics.multilabel_metrics(logits, np.ones_like(logits), threshold=np.full(3, 0.5))
    assert metrics.compute_metrics(logits, targets, False) == metrics.multiclass_metrics(logits, targets)
    multi_hot = np.eye(4)[[0, 1, 2, 3, 0]]
    ml = metrics.compute_metrics(logits, multi_hot, multi_label=True, threshold=0.6)
    assert ml == metrics.multilabel_metrics(logits, multi_hot, 0.6) and ml["exact_match"] == 1.0


def tuning_cases():
    for seed in range(12):
        logits, targets, _ = multilabel_case(seed)
        yield logits, targets
    rng = np.random.default_rng(7)  # the real size: N ~ 1500 notes, L ~ 236 codes, rare labels, shifted logits
    targets = rng.random((1500, 236)) < rng.uniform(0, 0.1, size=236)
    yield rng.normal(size=targets.shape) * 1.5 + 2.5 * targets - 2.5, targets


@pytest.mark.parametrize("average", ["micro", "macro"])
def test_tuning_never_lowers_f1_and_is_deterministic(average):
    key = f"{average}_f1"
    for logits, targets in tuning_cases():
        at_half = metrics.multilabel_metrics(logits, targets, 0.5)[key]
        global_t = metrics.tune_thresholds(logits, targets, per_label=False, average=average)
        per_label_t = metrics.tune_thresholds(logits, targets, per_label=True, average=average)
        assert type(global_t) is float and 0 < global_t < 1
        assert per_label_t.shape == (targets.shape[1],) and np.all((per_label_t > 0) & (per_label_t < 1))
        assert global_t == metrics.tune_thresholds(logits, targets, per_label=False, average=average)
        assert np.array_equal(per_label_t, metrics.tune_thresholds(logits, targets, True, average))
        tuned_global = metrics.multilabel_metrics(logits, targets, global_t)[key]
        tuned_per_label = metrics.multilabel_metrics(logits, targets, per_label_t)[key]
        assert at_half <= tuned_global <= tuned_per_label  # per-label tuning starts from the global optimum


def test_tuning_moves_when_it_helps_and_stays_at_half_otherwise():
    rng = np.random.default_rng(3)
    targets = rng.random((400, 5)) < 0.3
    logits = rng.normal(size=targets.shape) + 3.0 * targets - 4.0  # under-confident: 0.5 predicts too few
    t = metrics.tune_thresholds(logits, targets)
    assert t < 0.5
    tuned, at_half = metrics.multilabel_metrics(logits, targets, t), metrics.multilabel_metrics(logits, targets)
    assert tuned["micro_f1"] > at_half["micro_f1"]
    separable = np.where(targets, 5.0, -5.0)  # F1 = 1 at 0.5 already, and at many other thresholds
    assert metrics.tune_thresholds(separable, targets, average="macro") == 0.5
    assert np.all(metrics.tune_thresholds(separable, targets, per_label=True) == 0.5)


def test_format_table():
    table = metrics.format_table({"accuracy": 0.5, "epoch": 3, "macro_f1": np.float32(0.123456),
                                  "micro_roc_auc": float("nan"), "thresholds": np.ones(3), "split": "val"})
    assert table.splitlines() == [
        "accuracy       0.5000",
        "epoch               3",
        "macro_f1       0.1235",
        "micro_roc_auc     nan",
    ]
    assert metrics.format_table({}) == ""


def test_format_report():
    rows = [{"name": "diabetes", "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1},
            {"name": "sepsis", "precision": 1.0, "recall": 0.25, "f1": 0.4, "support": 3}]
    assert metrics.format_report(rows).splitlines() == [
        "              precision     recall   f1-score   support",
        "",
        "diabetes         0.5000     1.0000     0.6667         1",
        "sepsis           1.0000     0.2500     0.4000         3",
        "",
        "macro avg        0.7500     0.6250     0.5333         4",
        "weighted avg     0.8750     0.4375     0.4667         4",
    ]
    assert metrics.format_report([]) == " " * 12 + "  precision     recall   f1-score   support"


def test_ece_of_a_hand_computed_case():
    """15 bins of width 1/15. Top-label: confidences 0.95, 0.95 (one right) share the last bin: |0.5 - 0.95|;
    0.5 and 0.52 (both right) share bin 8, (7/15, 8/15]: |1 - 0.51|. ECE = (2 * 0.45 + 2 * 0.49) / 4."""
    confidence, outcome = np.array([0.95, 0.95, 0.5, 0.52]), np.array([1.0, 0.0, 1.0, 1.0])
    assert abs(metrics.expected_calibration_error(confidence, outcome) - (2 * 0.45 + 2 * 0.49) / 4) <= TOL
    count, mean_confidence, frequency = metrics.reliability_bins(confidence, outcome)
    assert count.tolist() == [0] * 7 + [2] + [0] * 6 + [2] and frequency[7] == 1.0 and frequency[14] == 0.5
    assert abs(mean_confidence[7] - 0.51) <= TOL
    # an edge belongs to the bin below it, and 0 to the first: (lo, hi]
    assert metrics.reliability_bins([0.0, 1 / 3, 1.0], [0, 0, 1])[0].nonzero()[0].tolist() == [0, 4, 14]
    # single-label logits: probabilities [0.8, 0.2] and [0.3, 0.7]; the second text's true class is 0
    logits = np.log([[0.8, 0.2], [0.3, 0.7]])
    ece = metrics.calibration_metrics(logits, [0, 0], multi_label=False)["ece"]
    assert abs(ece - (abs(1 - 0.8) + abs(0 - 0.7)) / 2) <= 1e-12
    # multi-label: every label decision is one point, each label's probability against its presence
    logits = np.log(np.array([[0.9, 0.1]]) / (1 - np.array([[0.9, 0.1]])))
    ece = metrics.calibration_metrics(logits, [[1, 1]], multi_label=True)["ece"]
    assert abs(ece - (0.1 + 0.9) / 2) <= 1e-12


@pytest.mark.parametrize("seed", SEEDS)
def test_brier_matches_sklearn(seed):
    skm = sklearn_metrics()
    logits, targets, _ = multilabel_case(seed)
    ours = metrics.calibration_metrics(logits, targets, multi_label=True)["brier"]
    assert_close(ours, skm.brier_score_loss(targets.ravel(), metrics.sigmoid(logits).ravel(), pos_label=1), "multi")
    logits, targets = multiclass_case(seed)
    n_classes = logits.shape[1]
    ours = metrics.calibration_metrics(logits, targets, multi_label=False)["brier"]
    probs = metrics.softmax(logits)
    if n_classes == 2:  # sklearn reads two classes as binary: the positive class's probability, halved sum
        ref = 2 * skm.brier_score_loss(targets, probs[:, 1], pos_label=1)
    else:
        ref = skm.brier_score_loss(targets, probs, labels=list(range(n_classes)))
    assert_close(ours, ref, "single")


@pytest.mark.parametrize("seed", SEEDS)
def test_f1_by_frequency_matches_sklearn_on_each_bucket(seed):
    skm = sklearn_metrics()
    rng = np.random.default_rng(seed)
    logits, targets, threshold = multilabel_case(seed)
    train_counts = rng.choice([0, 1, 5, 10, 11, 50, 51, 200, 201, 5000], size=targets.shape[1])
    buckets = metrics.f1_by_frequency(logits, targets, train_counts, threshold)
    edges = {"0": (0, 0), "1-10": (1, 10), "11-50": (11, 50), "51-200": (51, 200), ">200": (201, np.inf)}
    expected = [name for name, (lo, hi) in edges.items() if ((train_counts >= lo) & (train_counts <= hi)).any()]
    assert list(buckets) == expected  # in order, empty buckets left out
    preds = metrics.sigmoid(logits) >= np.asarray(threshold)
    for name, bucket in buckets.items():
        lo, hi = edges[name]
        cols = np.flatnonzero((train_counts >= lo) & (train_counts <= hi))
        y, p = targets[:, cols] > 0.5, preds[:, cols]
        assert bucket["labels"] == len(cols) and bucket["support"] == int(y.sum())
        for average in ("micro", "macro"):
            ref = skm.f1_score(y, p, average=average, zero_division=0) if len(cols) > 1 else \
                skm.f1_score(y[:, 0], p[:, 0], zero_division=0)  # one column is read as binary
            assert_close(bucket[f"{average}_f1"], ref, f"{name} {average}")
    table = metrics.format_frequency_table(buckets)
    assert len(table.splitlines()) == len(buckets) + 1 and table.splitlines()[1].startswith(expected[0])
