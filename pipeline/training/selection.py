"""The selection split: a fixed part of the training split that chooses epochs and sweep winners.

Scores used to *choose* (best epoch, early stopping, a sweep's winner) must not come from the split
that is then *reported*, or the report is optimistic. So the choices are made on examples carved from
the training split by a fixed rule that depends on nothing but the examples' GLUE idx: the same
examples for every method, seed, data seed and setting, and never trained on. The rows stay in the
store; the selection is a set of example indices into the training split.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from pipeline.common.errors import TrainingError

SELECTION = "selection"  # the name of the carved split in metrics, history columns and predictions
FRACTION = 0.1
CAP = 1000
_SALT = b"read-selection-v1"
RULE = (f"the {FRACTION:.0%} of the training examples (at least 1, at most {CAP:,}) whose GLUE idx has the "
        f"smallest blake2b-64 hash (salt {_SALT.decode()}); never trained on")


def selection_size(num_examples: int) -> int:
    """How many training examples the rule sets aside (the rest are trained on)."""
    return min(CAP, max(1, round(num_examples * FRACTION)))


def _hash(idx: int) -> int:
    return int.from_bytes(hashlib.blake2b(str(idx).encode(), digest_size=8, key=_SALT).digest(), "big")


def carve(ids: np.ndarray) -> np.ndarray:
    """Boolean mask over the training split's examples: True for the selection split.

    Ranked by a hash of each example's idx (ties by position), so the choice does not depend on the
    order of the rows, on seeds, or on anything trained.
    """
    ids = np.asarray(ids)
    n = len(ids)
    if n < 2:
        raise TrainingError(
            f"the training split has {n} example(s); at least 2 are needed to set a selection split apart (it is "
            "held out with --select-on validation too); extract more examples (a larger --limit, or none)"
        )
    keys = np.array([_hash(int(i)) for i in ids], dtype=np.uint64)
    chosen = np.argsort(keys, kind="stable")[: selection_size(n)]
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return mask


def describe(split: str, ids: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    """What metrics.json records of the selection split: the rule, its size and a hash of its ids."""
    chosen = np.sort(np.asarray(ids)[mask].astype(np.int64))
    return {
        "from_split": split,
        "rule": RULE,
        "size": int(mask.sum()),
        "trained_examples": int((~mask).sum()),
        "ids_sha256": hashlib.sha256(chosen.tobytes()).hexdigest(),
    }
