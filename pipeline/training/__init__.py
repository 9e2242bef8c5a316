"""Stage two: READ side networks trained from a store alone, never touching backbone code.

``network`` is the recurrence over layers, ``model`` the per-family model and its losses, ``batches`` reads
training batches from the store, ``trainer`` runs the lockstep training, ``metrics`` scores it, ``sweep`` spreads grids of runs over Dask workers.
"""

from pipeline.training.trainer import Trainer, train

__all__ = ["Trainer", "train"]
