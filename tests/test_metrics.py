"""metrics.py: hand-checkable numbers for accuracy, top-k, loss, calibration and the plot records."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from oracle_mnist.errors import OracleMnistError
from oracle_mnist.metrics import (
    confusion_records,
    evaluate,
    expected_calibration_error,
    per_class_accuracy,
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


def test_evaluate_has_every_field_with_right_values():
    logits = np.log(np.array([[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]))
    labels = np.array([0, 1, 1, 2])
    report = evaluate(logits, labels, NAMES, ece_bins=10)
    assert set(report) == {"accuracy", "macro_f1", "top2_accuracy", "loss", "ece", "n", "per_class"}
    assert report["accuracy"] == 0.75
    assert report["top2_accuracy"] == 1.0
    assert report["n"] == 4
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
