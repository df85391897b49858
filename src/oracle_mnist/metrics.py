"""Evaluation numbers from logits and labels (scikit-learn where it has them): accuracy, F1, top-k, loss,
calibration, confusion records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from oracle_mnist.errors import OracleMnistError


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities; `temperature` is the model's calibration (logits are divided by it)."""
    scaled = logits.astype(np.float64) / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int) -> float:
    """ECE: |accuracy - confidence| per equal-width confidence bin, weighted by the bin's share of samples."""
    return calibration_error(probs.max(axis=1), probs.argmax(axis=1) == labels, bins)


def calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int) -> float:
    """ECE from each prediction's confidence and whether it was right (bench/calibration.py draws the latter)."""
    # Bin i holds confidences in (i/bins, (i+1)/bins]; confidence is always > 0, so nothing is lost.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the cross-entropy of softmax(logits / T) (Guo et al., 2017).

    Fitted on the validation split: one scalar cannot change which class wins, so accuracy is untouched while
    the probabilities stop being over-confident. The loss is convex in 1/T, so a bounded scalar search finds the
    one minimum, deterministically.
    """
    from scipy.optimize import minimize_scalar

    logits64 = logits.astype(np.float64)
    rows = np.arange(len(labels))

    def nll(inverse_t: float) -> float:
        scaled = logits64 * inverse_t
        top = scaled.max(axis=1)
        log_z = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
        return float((log_z - scaled[rows, labels]).mean())

    # T within [0.05, 20]: wider than any trained network needs, and never 0 or negative.
    best = minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded", options={"xatol": 1e-6})
    return round(1.0 / float(best.x), 6)


def reliability_rows(probs: np.ndarray, labels: np.ndarray, bins: int, series: str) -> list[dict[str, Any]]:
    """Per non-empty confidence bin: mean confidence, accuracy and count (a reliability diagram's points)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    return [
        {
            "probabilities": series,
            "confidence": _r(float(confidence[which == b].mean())),
            "accuracy": _r(float(correct[which == b].mean())),
            "images": int((which == b).sum()),
        }
        for b in range(bins)
        if (which == b).any()
    ]


def evaluate(
    logits: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    ece_bins: int = 15,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """All test metrics as one JSON-able dict, from the calibrated probabilities (those the model serves);
    `ece_uncalibrated` is the ECE before the temperature. `per_class` is for a separate file: in a metrics
    file each number would be a `dvc exp show` column."""
    n_classes = len(class_names)
    if logits.ndim != 2 or logits.shape != (len(labels), n_classes):
        raise OracleMnistError(
            f"logits {logits.shape} do not match {len(labels)} labels x {n_classes} classes"
        )
    if len(labels) == 0:
        raise OracleMnistError("no test images to evaluate")
    # Imported here: serving uses softmax from this module and should not pay for loading scikit-learn.
    from sklearn.metrics import f1_score, log_loss, precision_recall_fscore_support, top_k_accuracy_score

    probs = softmax(logits, temperature)
    preds = probs.argmax(axis=1)
    classes = list(range(n_classes))
    # With two classes scikit-learn wants the positive class's score alone (top-2 of 2 is then 1, with a warning).
    top2 = top_k_accuracy_score(labels, probs if n_classes > 2 else probs[:, 1], k=2, labels=classes)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=classes, zero_division=0
    )
    return {
        "accuracy": _r(float((preds == labels).mean())),
        "macro_f1": _r(float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0))),
        "top2_accuracy": _r(top2),
        "loss": _r(log_loss(labels, probs, labels=classes)),  # cross-entropy, without label smoothing
        "ece": _r(expected_calibration_error(probs, labels, ece_bins)),
        "ece_uncalibrated": _r(expected_calibration_error(softmax(logits), labels, ece_bins)),
        "per_class": {
            name: {
                "precision": _r(float(precision[i])),
                "recall": _r(float(recall[i])),
                "f1": _r(float(f1[i])),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
    }


def confusion_records(
    labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str]
) -> list[dict[str, str]]:
    """One {actual, predicted} row per sample: the input DVC's confusion templates count themselves."""
    return [
        {"actual": class_names[t], "predicted": class_names[p]} for t, p in zip(labels, preds, strict=True)
    ]


def per_class_accuracy(
    labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """Rows {class, accuracy} (the class's recall) for a bar plot; a class without samples gets 0."""
    rows = []
    for i, name in enumerate(class_names):
        members = labels == i
        rows.append(
            {"class": name, "accuracy": _r(float((preds[members] == i).mean()) if members.any() else 0.0)}
        )
    return rows


def _r(value: float) -> float:
    # Six decimals: differences below that are float noise, and shorter numbers read better in `dvc exp show`.
    return round(value, 6)
