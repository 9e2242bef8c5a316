"""GLUE metrics against hand computations on tiny arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.common.tasks import TASKS
from pipeline.training.metrics import compute_metrics, primary_metric

# A metric prints nothing: a warning on stderr would leak through `pipeline train --quiet` (and from Dask workers).
pytestmark = pytest.mark.filterwarnings("error")


def test_cola_matthews_by_formula():
    labels = np.array([1, 1, 1, 0, 0, 1, 0, 1])
    preds = np.array([1, 0, 1, 0, 1, 1, 0, 1])
    tp, tn, fp, fn = 4, 2, 1, 1
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    out = compute_metrics("cola", preds, labels)
    assert set(out) == {"matthews_correlation"}
    assert out["matthews_correlation"] == pytest.approx(100 * mcc)
    assert type(out["matthews_correlation"]) is float


def test_cola_constant_prediction_is_zero():
    out = compute_metrics("cola", np.ones(4, dtype=int), np.array([0, 1, 1, 0]))
    assert out["matthews_correlation"] == 0.0


def test_degenerate_inputs_give_the_documented_values_without_warnings():
    """A single class in labels and predictions, or a (nearly) constant predictor: common on a small or early
    evaluation. The values are the formulas' (a zero denominator gives 0), and no warning reaches stderr."""
    # All labels and predictions 1: tp=4, tn=fp=fn=0, so MCC's denominator (tp+fp)(tp+fn)(tn+fp)(tn+fn) is 0: 0.
    assert compute_metrics("cola", np.ones(4, dtype=int), np.ones(4, dtype=int)) == {"matthews_correlation": 0.0}
    assert compute_metrics("cola", np.zeros(4, dtype=int), np.zeros(4, dtype=int)) == {"matthews_correlation": 0.0}
    # No positives anywhere: F1 = 2tp / (2tp + fp + fn) = 0/0, scored 0; every prediction right.
    assert compute_metrics("mrpc", np.zeros(3, dtype=int), np.zeros(3, dtype=int)) == {
        "f1": 0.0, "accuracy": 100.0, "combined": 50.0}
    assert compute_metrics("qqp", np.ones(3, dtype=int), np.ones(3, dtype=int)) == {
        "f1": 100.0, "accuracy": 100.0, "combined": 100.0}
    assert compute_metrics("sst2", np.ones(3, dtype=int), np.ones(3, dtype=int)) == {"accuracy": 100.0}
    # Constant labels (not only predictions): a correlation is undefined there, taken as 0.
    assert compute_metrics("stsb", np.array([1.0, 2.0, 3.0]), np.full(3, 2.0))["combined"] == 0.0
    # Nearly constant predictions: still a correlation, the formula's.
    preds, labels = np.array([1.0, 1.0, 1.0 + 1e-12, 1.0]), np.array([1.0, 2.0, 3.0, 4.0])
    out = compute_metrics("stsb", preds, labels)
    assert out["pearson"] == pytest.approx(100 * np.corrcoef(preds, labels)[0, 1], rel=1e-3)
    assert out["spearmanr"] == pytest.approx(100 * np.corrcoef([2, 2, 4, 2], [1, 2, 3, 4])[0, 1])  # tied ranks shared


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_f1_and_accuracy_by_hand(task):
    labels = np.array([1, 0, 1, 1, 0, 0])
    preds = np.array([1, 1, 0, 1, 0, 0])
    tp, fp, fn = 2, 1, 1
    f1 = 2 * tp / (2 * tp + fp + fn)
    acc = 4 / 6
    out = compute_metrics(task, preds, labels)
    assert set(out) == {"f1", "accuracy", "combined"}
    assert out["f1"] == pytest.approx(100 * f1)
    assert out["accuracy"] == pytest.approx(100 * acc)
    assert out["combined"] == pytest.approx(50 * (f1 + acc))
    assert all(type(v) is float for v in out.values())


def test_f1_without_positive_predictions_is_zero():
    out = compute_metrics("mrpc", np.zeros(3, dtype=int), np.array([1, 0, 1]))
    assert out["f1"] == 0.0
    assert out["accuracy"] == pytest.approx(100 / 3)


@pytest.mark.parametrize("task", ["sst2", "mnli", "qnli", "rte", "wnli"])
def test_accuracy_tasks(task):
    labels = np.array([0, 1, 1, 0, 1])
    preds = np.array([0, 1, 0, 0, 0])
    assert compute_metrics(task, preds, labels) == {"accuracy": pytest.approx(60.0)}


def test_mnli_three_classes():
    out = compute_metrics(TASKS["mnli"], np.array([0, 1, 2, 2]), np.array([0, 1, 2, 1]))
    assert out["accuracy"] == pytest.approx(75.0)


def test_stsb_pearson_spearman():
    labels = np.array([0.0, 1.2, 2.5, 3.1, 4.8, 5.0], dtype=np.float32)
    preds = np.array([0.5, 1.0, 3.0, 2.8, 4.0, 4.9], dtype=np.float32)
    pearson = np.corrcoef(preds.astype(np.float64), labels.astype(np.float64))[0, 1]
    # Spearman = Pearson of the ranks (no ties here).
    rank = lambda x: np.argsort(np.argsort(x)).astype(np.float64)  # noqa: E731
    spearman = np.corrcoef(rank(preds), rank(labels))[0, 1]
    out = compute_metrics("stsb", preds, labels)
    assert set(out) == {"pearson", "spearmanr", "combined"}
    assert out["pearson"] == pytest.approx(100 * pearson)
    assert out["spearmanr"] == pytest.approx(100 * spearman)
    assert out["combined"] == pytest.approx(50 * (pearson + spearman))
    assert all(type(v) is float for v in out.values())


def test_stsb_constant_prediction_is_zero_not_nan():
    out = compute_metrics("stsb", np.full(4, 2.5), np.array([1.0, 2.0, 3.0, 4.0]))
    assert out == {"pearson": 0.0, "spearmanr": 0.0, "combined": 0.0}


def test_refuses_unlabeled_and_mismatched():
    with pytest.raises(ValueError, match="unlabeled"):
        compute_metrics("rte", np.array([0, 1]), np.array([-1, -1]))
    with pytest.raises(ValueError, match="unlabeled"):
        compute_metrics("stsb", np.array([1.0, 2.0]), np.array([np.nan, np.nan]))
    with pytest.raises(ValueError, match=r"equal shape"):
        compute_metrics("rte", np.array([0, 1, 1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="not logits"):
        compute_metrics("rte", np.zeros((2, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="no examples"):
        compute_metrics("rte", np.array([], dtype=int), np.array([], dtype=int))


@pytest.mark.parametrize(
    "task, name",
    [("cola", "matthews_correlation"), ("stsb", "combined"), ("mrpc", "combined"),
     ("qqp", "combined"), ("sst2", "accuracy"), ("mnli", "accuracy"), ("qnli", "accuracy"),
     ("rte", "accuracy"), ("wnli", "accuracy")],
)
def test_primary_metric_is_reported(task, name):
    assert primary_metric(task) == name
    spec = TASKS[task]
    preds = labels = np.array([0.0, 1.0, 2.0]) if spec.kind == "regression" else np.array([0, 1, 1])
    assert name in compute_metrics(task, preds, labels)
