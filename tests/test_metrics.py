"""metrics.py: hand-checkable numbers for accuracy, top-k, loss, calibration and the plot records."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from oracle_mnist.errors import OracleMnistError
from oracle_mnist.metrics import (
    calibration_error,
    confusion_records,
    evaluate,
    expected_calibration_error,
    fit_temperature,
    per_class_accuracy,
    reliability_rows,
    softmax,
)

NAMES = ("a", "b", "c")


def test_softmax_and_loss_match_hand_values():
    logits = np.array([[0.0, 0.0, 0.0], [1000.0, 0.0, 0.0]])
    probs = softmax(logits)
    np.testing.assert_allclose(probs[0], [1 / 3] * 3)
    np.testing.assert_allclose(probs[1], [1.0, 0.0, 0.0], atol=1e-12)  # no overflow at large logits
    assert evaluate(logits, np.array([2, 0]), NAMES)["loss"] == pytest.approx(math.log(3) / 2, abs=1e-6)


def test_top2_accuracy_counts_true_class_among_two_best():
    logits = np.log(np.array([[0.5, 0.3, 0.2]] * 3))
    report = evaluate(logits, np.array([0, 1, 2]), NAMES)
    assert report["accuracy"] == pytest.approx(1 / 3, abs=1e-6)
    assert report["top2_accuracy"] == pytest.approx(2 / 3, abs=1e-6)
    # Classes missing from the labels still count as candidates.
    assert evaluate(logits[:2], np.array([2, 2]), NAMES)["top2_accuracy"] == 0.0


def test_evaluate_works_with_two_classes():
    logits = np.log(np.array([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7]]))
    with pytest.warns(UserWarning, match="perfect score"):  # top-2 of 2 classes: always right, and said so
        report = evaluate(logits, np.array([0, 0, 1]), ("a", "b"))
    assert (report["accuracy"], report["top2_accuracy"]) == (pytest.approx(2 / 3, abs=1e-6), 1.0)
    assert report["loss"] == pytest.approx(-np.mean(np.log([0.8, 0.4, 0.7])), abs=1e-6)


@pytest.mark.slow  # a fresh interpreter importing torch and timm: 3.6 s, a twentieth of the fast tier
def test_importing_the_serving_side_does_not_load_scikit_learn():
    code = "import sys, oracle_mnist.inference, oracle_mnist.metrics; print('sklearn' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert proc.stdout.strip() == "False"


def test_ece_is_zero_when_calibrated_and_gap_when_overconfident():
    # Two bins: confidence 0.75 with 3 of 4 right is calibrated.
    probs = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(probs, np.array([0, 0, 0, 1]), bins=2) == pytest.approx(0.0)
    # Confidence 0.9, half right: gap 0.4 on all samples.
    probs = np.array([[0.9, 0.1]] * 4)
    assert expected_calibration_error(probs, np.array([0, 0, 1, 1]), bins=10) == pytest.approx(0.4)


def test_calibration_error_weights_each_bins_gap_by_its_share():
    # Bin (0.5, 0.6]: confidence 0.55, 1 of 2 right -> gap 0.05 on half; bin (0.9, 1.0]: 0.95, 2 of 2 -> 0.05 on half.
    confidence = np.array([0.55, 0.55, 0.95, 0.95])
    correct = np.array([True, False, True, True])
    assert calibration_error(confidence, correct, bins=10) == pytest.approx(0.05)
    # The same answers as probabilities give the same ECE through expected_calibration_error.
    probs = np.stack([confidence, 1 - confidence], axis=1)
    assert expected_calibration_error(probs, np.where(correct, 0, 1), 10) == pytest.approx(0.05)


def test_evaluate_has_every_field_with_right_values():
    logits = np.log(np.array([[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]))
    labels = np.array([0, 1, 1, 2])
    report = evaluate(logits, labels, NAMES, ece_bins=10)
    assert set(report) == {
        "accuracy",
        "macro_f1",
        "top2_accuracy",
        "loss",
        "ece",
        "ece_uncalibrated",
        "per_class",
    }
    assert report["accuracy"] == 0.75
    assert report["top2_accuracy"] == 1.0
    assert report["ece"] == report["ece_uncalibrated"]  # temperature 1
    assert report["loss"] == pytest.approx(-np.mean(np.log([0.8, 0.7, 0.3, 0.6])), abs=1e-6)
    # a: P 1/2 R 1; b: P 1 R 1/2; c: P 1 R 1.
    assert report["per_class"]["a"] == {"precision": 0.5, "recall": 1.0, "f1": 0.666667, "support": 1}
    assert report["per_class"]["b"] == {"precision": 1.0, "recall": 0.5, "f1": 0.666667, "support": 2}
    assert report["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3, abs=1e-6)


def test_evaluate_rejects_mismatched_shapes():
    with pytest.raises(OracleMnistError, match="do not match 2 labels x 3 classes"):
        evaluate(np.zeros((2, 4)), np.array([0, 1]), NAMES)


def test_confusion_records_and_per_class_accuracy():
    labels, preds = np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0])
    records = confusion_records(labels, preds, NAMES)
    assert len(records) == 5
    assert records[1] == {"actual": "a", "predicted": "b"}
    assert per_class_accuracy(labels, preds, NAMES) == [
        {"class": "a", "accuracy": 0.5},
        {"class": "b", "accuracy": 1.0},
        {"class": "c", "accuracy": 0.5},
    ]


def calibrated_sample(n: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits) itself: calibrated at temperature 1 by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(n, classes))
    probs = softmax(logits)
    labels = np.array([rng.choice(classes, p=p) for p in probs])
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_scale_of_over_and_under_confident_logits(true_t: float):
    logits, labels = calibrated_sample(20_000)
    assert fit_temperature(logits * true_t, labels) == pytest.approx(true_t, rel=0.05)


def test_temperature_fixes_calibration_and_keeps_every_prediction():
    logits, labels = calibrated_sample(5_000, seed=1)
    overconfident = logits * 3.0
    t = fit_temperature(overconfident[:2_500], labels[:2_500])  # fitted on one half, judged on the other
    held_out, held_labels = overconfident[2_500:], labels[2_500:]
    before = expected_calibration_error(softmax(held_out), held_labels, 15)
    after = expected_calibration_error(softmax(held_out, t), held_labels, 15)
    assert after < 0.03 < before
    assert (softmax(held_out, t).argmax(axis=1) == held_out.argmax(axis=1)).all()
    report = evaluate(held_out, held_labels, tuple("abcdefghij"), temperature=t)
    assert report["ece_uncalibrated"] == pytest.approx(before, abs=1e-6)
    assert report["ece"] == pytest.approx(after, abs=1e-6)


def test_reliability_rows_cover_every_image_once():
    logits, labels = calibrated_sample(1_000, seed=2)
    rows = reliability_rows(softmax(logits), labels, 15, "calibrated")
    assert sum(r["images"] for r in rows) == 1_000
    assert all(0 <= r["accuracy"] <= 1 and 0 < r["confidence"] <= 1 for r in rows)
    assert [r["confidence"] for r in rows] == sorted(r["confidence"] for r in rows)
