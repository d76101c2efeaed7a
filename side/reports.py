"""The classifier's report after training: the best checkpoint (the last one without validation data) reloaded from
disk, its temperature fit on the validation data (--calibrate temperature, side/calibrate.py), then validation and
test scores with calibration (ECE, Brier), and for multi-label data F1 by how often each label occurs in the
training data.

final_report -> report.txt, test_metrics.json, calibration.png (with matplotlib)
threshold_list   a tuned threshold as config.json keeps it
"""
import os

import numpy as np

from metrics import (calibration_inputs, calibration_metrics, f1_by_frequency, format_frequency_table, format_report,
                     format_table, per_class_report)
from model import EncoderClassifier
from side import calibrate, files
from side.logs import plot_reliability

CALIBRATION_KEYS = ("ece", "brier")
NO_VALIDATION = "no validation data (--val-fraction 0): the model is the last step's"
TERMINAL_LABELS = 15  # a per-label table longer than this is printed as its weakest labels (report.txt has it all)


def final_report(objective, out_dir, calibration, device, best):
    """Reload the best checkpoint from disk (proves it loads), calibrate it when asked (calibration: off |
    temperature), then report on the validation and test data (either may be absent: --val-fraction 0, no
    --test-file). objective: train.py's Classification."""
    model = EncoderClassifier.from_pretrained(out_dir, device=device, verbose=False)
    calibrate.set_temperature(model.config, None)  # a report made again after a kill fits it anew, from raw logits
    raw = {name: (objective.logits(model, objective.splits[key]), objective.splits[key].targets)
           for name, key in (("validation", "val"), ("test", "test")) if key in objective.splits}
    lines = [f"best validation {objective.metric}: {best:.4f}" if "validation" in raw else NO_VALIDATION]
    if calibration == "temperature":
        lines.append(fit_and_save(model, objective, *raw["validation"], out_dir))
    scored = {name: score(model, objective, logits, targets, calibration != "off")
              for name, (logits, targets) in raw.items()}
    validation = None  # no validation data: none of its numbers, rather than a made-up one
    if "validation" in scored:
        validation = {k: v for k, v in scored["validation"][0].items() if k.startswith(CALIBRATION_KEYS)}
        lines += ["", "validation calibration", format_table(validation)]
    if not scored:
        lines.append("nothing scored: no validation data and no --test-file")
    result = {"best_val": best, "validation": validation}
    if "test" in scored:
        metrics, logits = scored["test"]
        lines += ["", f"test ({len(logits)} texts)", format_table(metrics)]
        if model.config.multi_label:
            metrics["by_label_frequency"] = f1_by_frequency(logits, raw["test"][1], train_counts(objective),
                                                            np.asarray(model.config.thresholds))
            lines += ["", "test F1 by the labels' count of training texts", format_frequency_table(
                metrics["by_label_frequency"])]
        rows = per_class_report(logits, raw["test"][1], model.config.multi_label, objective.labels.names,
                                model.config.thresholds if model.config.multi_label else 0.5)
        shown = len(lines) + 1  # the terminal gets the report up to here, then terminal_table
        lines += ["", format_report(rows)]
        result["test"] = metrics
        files.write_json(os.path.join(out_dir, "test_metrics.json"), {**metrics, "validation": validation})
    on_screen = lines if "test" not in scored else lines[:shown] + [terminal_table(rows)]
    write_report(out_dir, "\n".join(lines), "\n".join(on_screen))
    if raw:
        plot_reliability(os.path.join(out_dir, "calibration.png"), reliability_curves(model, raw, calibration != "off"))
    return result


def fit_and_save(model, objective, logits, targets, out_dir):
    """Fit the temperature on the validation logits, tune the thresholds after it, write both into config.json.
    Returns the report's line about it."""
    multi = model.config.multi_label
    temperature = calibrate.fit_temperature(logits, targets, multi)
    if temperature is None:  # the config.json saved stays uncalibrated
        return (f"calibration: none; the {len(targets)} validation text(s) give the temperature no optimum (the fit "
                f"ran to the edge of its search, {calibrate.BOUNDS}): the model is saved uncalibrated; calibrate "
                "with more validation data")
    calibrate.set_temperature(model.config, temperature)
    _, threshold, _ = objective.score(model, logits, targets)  # thresholds tuned on the calibrated probabilities
    model.config.thresholds = threshold_list(threshold, model.config.num_labels)
    calibrate.save_calibration(out_dir, temperature, model.config.thresholds)
    if not multi:
        return f"calibration: temperature {temperature:.4f}, fit on the validation data"
    spread = np.asarray(temperature)
    return (f"calibration: a temperature per label, {spread.min():.4f} to {spread.max():.4f} (median "
            f"{np.median(spread):.4f}); labels with fewer than {calibrate.MIN_POSITIVES} validation texts with or "
            "without them, or separated perfectly there, share one")


def score(model, objective, logits, targets, calibrated):
    """(metrics at the saved thresholds, the logits as the model reports them: divided by its temperature);
    calibrated: ECE and Brier of the raw logits too, as <name>_uncalibrated."""
    saved = np.asarray(model.config.thresholds) if model.config.multi_label else None
    metrics, _, reported = objective.score(model, logits, targets, saved)
    if calibrated:
        raw = calibration_metrics(logits, targets, model.config.multi_label)
        metrics.update({f"{k}_uncalibrated": v for k, v in raw.items()})
    return metrics, reported


def reliability_curves(model, raw, calibrated):
    """The test data's (the validation data's without a test file) decisions, before and after calibration."""
    name = "test" if "test" in raw else "validation"
    logits, targets = raw[name]
    multi = model.config.multi_label
    curves = {f"{name}, uncalibrated" if calibrated else name: calibration_inputs(logits, targets, multi)}
    if calibrated:
        curves[f"{name}, temperature-scaled"] = calibration_inputs(
            logits / calibrate.temperature_of(model.config), targets, multi)
    return curves


def train_counts(objective):
    """Each label's count of training texts (a soft target counts where it is over 0.5, as metrics.py reads it)."""
    return (objective.splits["train"].targets > 0.5).sum(axis=0)


def terminal_table(rows):
    """The per-label table as the terminal shows it: whole for up to TERMINAL_LABELS labels; else the labels with
    the lowest F1 among those in the test data, and the averages over every label (the whole table: report.txt)."""
    table = format_report(rows).splitlines()
    if len(rows) <= TERMINAL_LABELS:
        return "\n".join(table)
    header, body, averages = table[0], table[2:2 + len(rows)], table[2 + len(rows):]
    present = [i for i, r in enumerate(rows) if r["support"] > 0]
    weakest = sorted(present, key=lambda i: rows[i]["f1"])[:TERMINAL_LABELS]
    title = (f"the {len(weakest)} labels with the lowest test F1 (of {len(present)} in the test data, "
             f"{len(rows)} in all: every one is in report.txt)")
    return "\n".join([title, header, "", *(body[i] for i in weakest), *averages])


def write_report(out_dir, report, on_screen=None):
    """report.txt gets the whole report; the terminal on_screen (None: the same)."""
    files.write_text(os.path.join(out_dir, "report.txt"), report + "\n")
    print("\n" + (report if on_screen is None else on_screen) + f"\n\nsaved to {out_dir}/ (report.txt)")


def threshold_list(threshold, num_labels):
    """A threshold (None, a number or one per label) as config.json keeps it: one float per label."""
    if threshold is None:
        return None
    return [float(t) for t in np.broadcast_to(np.asarray(threshold, np.float64), (num_labels,))]
