"""Official GLUE metrics, x100 as papers report them, computed locally.

``evaluate`` would fetch its metric scripts from the Hub at run time, so the same definitions are
written here on top of scikit-learn and SciPy (GLUE's own scorer uses the same ones).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
from scipy.stats import ConstantInputWarning, NearConstantInputWarning, pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from pipeline.common.tasks import TaskSpec, get_task

_F1_TASKS = ("mrpc", "qqp")


def primary_metric(task: str | TaskSpec) -> str:
    """The single number used for model selection on ``task``."""
    spec = _spec(task)
    if spec.name == "cola":
        return "matthews_correlation"
    if spec.name == "stsb" or spec.name in _F1_TASKS:
        return "combined"
    return "accuracy"


def compute_metrics(task: str | TaskSpec, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE metrics of ``predictions`` against ``labels``, each x100, as plain floats.

    predictions: (N,) class indices, or (N,) scores for stsb. Unlabeled examples (-1 / nan) are refused:
    test splits have no labels to score against.
    """
    spec = _spec(task)
    preds = np.asarray(predictions)
    gold = np.asarray(labels)
    if preds.ndim != 1 or gold.ndim != 1 or preds.shape != gold.shape:
        raise ValueError(
            f"{spec.name}: expected predictions and labels of equal shape (N,), got "
            f"{preds.shape} and {gold.shape} (pass class indices, e.g. logits.argmax(-1), not logits)"
        )
    if preds.size == 0:
        raise ValueError(f"{spec.name}: no examples to score")

    if spec.kind == "regression":
        preds = preds.astype(np.float64)
        gold = gold.astype(np.float64)
        if not (np.isfinite(gold).all() and np.isfinite(preds).all()):
            raise ValueError(f"{spec.name}: non-finite labels or predictions (unlabeled test split?)")
        with _degenerate_inputs_expected():
            pearson = 100.0 * _correlation(pearsonr, preds, gold)
            spearman = 100.0 * _correlation(spearmanr, preds, gold)
        return {"pearson": pearson, "spearmanr": spearman, "combined": (pearson + spearman) / 2}

    if (gold < 0).any() or (gold >= spec.num_labels).any():
        raise ValueError(
            f"{spec.name}: labels outside 0..{spec.num_labels - 1} (-1 marks an unlabeled test split)"
        )
    with _degenerate_inputs_expected():
        if spec.name == "cola":
            return {"matthews_correlation": 100.0 * float(matthews_corrcoef(gold, preds))}
        accuracy = 100.0 * float(accuracy_score(gold, preds))
        if spec.name in _F1_TASKS:
            # Positive class 1 (equivalent / duplicate), as GLUE scores it.
            f1 = 100.0 * float(f1_score(gold, preds, pos_label=1, average="binary", zero_division=0.0))
            return {"f1": f1, "accuracy": accuracy, "combined": (f1 + accuracy) / 2}
    return {"accuracy": accuracy}


@contextlib.contextmanager
def _degenerate_inputs_expected() -> Iterator[None]:
    """Silence the warnings that degenerate inputs raise, whose results are the documented ones.

    A small or early evaluation often has a single class in its labels and predictions, or a constant predictor
    (the majority baseline is one): scikit-learn then warns about the confusion matrix's shape, though its Matthews
    correlation is 0 as documented, and SciPy about (nearly) constant input to a correlation. Training runs with
    --quiet, and on Dask workers, so such a warning would only be noise on stderr; any other warning still shows.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="A single label was found in 'y_true' and 'y_pred'",
                                category=UserWarning)
        warnings.filterwarnings("ignore", category=ConstantInputWarning)
        warnings.filterwarnings("ignore", category=NearConstantInputWarning)
        yield


def _correlation(fn, preds: np.ndarray, gold: np.ndarray) -> float:
    """A correlation, taken as 0 when either side is constant (undefined there, nan in SciPy).

    Zero, like scikit-learn's Matthews correlation for a constant predictor, so that model selection
    compares numbers rather than nan.
    """
    if np.ptp(preds) == 0 or np.ptp(gold) == 0:
        return 0.0
    return float(fn(preds, gold)[0])


def _spec(task: str | TaskSpec) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else get_task(task)
