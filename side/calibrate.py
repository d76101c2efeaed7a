"""Temperature scaling (Guo et al. 2017, "On calibration of modern neural networks"): the logits are divided by a
temperature T fit on validation data, so that a probability of 0.9 is right about 90% of the time. T > 1 softens
an over-confident model, T < 1 sharpens an under-confident one; the ranking of classes (and so accuracy and
ROC-AUC) does not change, while multi-label decisions at a threshold do: train.py tunes thresholds after T.

fit_temperature   one T (single-label), or one per label (multi-label) with a shared one for rare labels and for
    labels whose validation decisions are separated perfectly
temperature_of / set_temperature   where a model keeps its T: config.json's calibration_temperature
save_calibration   T and the thresholds tuned after it, written into a saved folder's config.json

The key is ours: transformers keeps an unknown config.json key as an attribute and never applies it, so the folder
still loads there, with raw (uncalibrated) logits. It is not named `temperature`, which transformers reads as a
text-generation setting.
"""
import json
import os

import numpy as np

from side import files

KEY = "calibration_temperature"
# multi-label: a label gets a temperature of its own when the validation data has at least this many texts with
# it and as many without; the others share one fit on all label decisions together
MIN_POSITIVES = 10
BOUNDS = (0.05, 20.0)  # the temperatures searched
_GOLDEN = (np.sqrt(5) - 1) / 2


def fit_temperature(logits, targets, multi_label, min_positives=MIN_POSITIVES):
    """The temperature minimising the validation negative log-likelihood: a float (single-label), or a list
    of one per label (multi-label). A label whose fit ends at the edge of BOUNDS takes the shared one: its
    validation texts are separated perfectly, so sharpening lowers their NLL without end (there is no optimum),
    and a test error at T = 0.05 would be 20 times as confident. None when the single-label (or the shared) fit
    ends there: the validation data has no optimum to give (one text, or all of them separated), so the model
    stays uncalibrated rather than take a temperature from the search's edge."""
    if not multi_label:
        logits, targets = np.asarray(logits, np.float64), np.asarray(targets).astype(np.int64)
        nll = lambda beta: softmax_nll(logits, targets, beta)
        fit = float(minimise(nll, 1)[0])
        return fit if has_optimum(nll, fit) else None
    logits, targets = np.asarray(logits, np.float64), (np.asarray(targets) > 0.5).astype(np.float64)
    nll = lambda beta: sigmoid_nll(logits.ravel()[:, None], targets.ravel()[:, None], beta)
    shared = minimise(nll, 1)[0]
    if not has_optimum(nll, shared):
        return None
    positives = targets.sum(axis=0)
    own = (positives >= min_positives) & (len(targets) - positives >= min_positives)
    temperature = np.full(logits.shape[1], shared)
    if own.any():
        fit = minimise(lambda beta: sigmoid_nll(logits[:, own], targets[:, own], beta), int(own.sum()))
        temperature[own] = np.where(inside_bounds(fit), fit, shared)
    return [float(t) for t in temperature]


def has_optimum(nll, temperature):
    """The fit does better than either edge of the search (where the likelihood keeps improving without end, the
    search stops near an edge, on a plateau its floats no longer tell apart)."""
    at = lambda t: float(nll(np.array([1.0 / t]))[0])
    return inside_bounds(temperature) and at(temperature) < min(at(BOUNDS[0]), at(BOUNDS[1]))


def inside_bounds(temperature):
    """A fit that did not stop at the edge of the search (there it found no optimum)."""
    return (temperature > BOUNDS[0] * 1.001) & (temperature < BOUNDS[1] * 0.999)


def softmax_nll(logits, targets, beta):
    """Mean cross-entropy of softmax(beta * logits), for each candidate beta = 1 / T (shape [1])."""
    z = logits * beta[0]
    top = z.max(axis=1)
    log_norm = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return np.array([np.mean(log_norm - z[np.arange(len(z)), targets])])


def sigmoid_nll(logits, targets, beta):
    """Mean binary cross-entropy of sigmoid(beta * logits) per column, each column with its own beta."""
    z = logits * beta
    return np.mean(np.logaddexp(0.0, z) - targets * z, axis=0)


def minimise(nll, n):
    """n temperatures at once, each minimising its own entry of nll(beta) over T in BOUNDS. The negative
    log-likelihood is convex in beta = 1 / T, so a golden-section search on log(beta) finds the minimum; 100
    steps narrow the interval below 1e-20."""
    lo, hi = np.full(n, -np.log(BOUNDS[1])), np.full(n, -np.log(BOUNDS[0]))
    for _ in range(100):
        left, right = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
        lower_left = nll(np.exp(left)) <= nll(np.exp(right))
        lo, hi = np.where(lower_left, lo, left), np.where(lower_left, right, hi)
    return 1.0 / np.exp((lo + hi) / 2)


def temperature_of(config):
    """What the model's logits are divided by: 1 (uncalibrated), a scalar or one per label."""
    return np.asarray(config.hf.get(KEY, 1.0), np.float32)


def set_temperature(config, temperature):
    """Keep (None: drop) the temperature in the config's config.json dict, which save_pretrained writes back."""
    if temperature is None:
        config.hf.pop(KEY, None)
    else:
        config.hf[KEY] = temperature


def save_calibration(folder, temperature, thresholds):
    """Write the temperature and the thresholds tuned after it into folder/config.json, replacing it whole
    (side/files.py: a kill leaves the old file or the new one)."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config[KEY] = temperature
    if thresholds is not None:
        config["thresholds"] = thresholds
    files.write_json(path, config, "the calibrated config", sort_keys=True)
