"""A training run's state between two steps, so that a stopped `pipeline train` goes on where it was.

Everything the rest of a run depends on is saved between steps, at most every ``checkpoint_seconds`` (0: after
each epoch only), to ``<out>/checkpoint.pt``, written whole or not at all: every seed's weights, AdamW's
moments, the schedule's step, the dropout streams' positions, each seed's best epoch so far (weights, scores,
predictions), the patience counters, the history, and within an epoch the batches done and their loss sums.
The batch order is a function of the epoch alone, so a run resumed from epoch k, batch j writes the outputs
an uninterrupted run writes. A checkpoint is used only by a run of the
same store, torch version, training device and result-changing settings (``identity``); it is removed
once the run's outputs are written. It is not a DVC output, so `dvc repro` leaves it for the rerun. One a run
does not use for its other settings is moved to ``<out>/checkpoint.replaced.pt`` rather than overwritten by the
run's first save, and a rerun with its settings goes on from it: a mistyped setting loses no progress. One that
cannot be read, or that ``--no-resume`` refuses, is kept as ``checkpoint.discarded.pt``, which no run reads.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.common.config import TrainConfig
from pipeline.common.files import atomic_write_bytes, partial_path

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pt"
REPLACED_NAME = "checkpoint.replaced.pt"  # the latest checkpoint of other settings a run started over from, kept
DISCARDED_NAME = "checkpoint.discarded.pt"  # unreadable, or refused with --no-resume: kept for a look, never read
FORMAT = 2  # 2: a checkpoint may be saved within an epoch
# Settings that change how a run goes, never what it computes: a rerun may change them and still resume. The
# memory budgets choose between held and streamed rows, whose batch order can differ: the identity records
# which one the run used instead. The store is known by its fingerprint, not by the path it was given by (a
# relative path, or the store moved to a faster disk, is the same store).
HOW_ONLY = ("out", "cache", "device", "threads", "memory_budget", "host_memory_budget", "checkpoint_seconds", "resume")


def result_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The train settings that change what a run computes (``HOW_ONLY`` left out): what a checkpoint must match to
    go on, and a sweep's finished point to be kept."""
    return {k: v for k, v in settings.items() if k not in HOW_ONLY}


def run_identity(cfg: TrainConfig, fingerprint: str, device: torch.device, streamed: bool,
                 eval_splits: Sequence[str]) -> dict[str, Any]:
    """What must be the same for a checkpoint to continue this run: the store, the code's numerics, the
    device that computes, the batch order's source and every setting that changes results, defaults resolved
    (``eval_splits``: the splits scored, whether named or the task's default)."""
    settings = result_settings(cfg.to_dict())
    return {"format": FORMAT, "store": fingerprint, "torch": str(torch.__version__), "device": str(device),
            "rows": "streamed" if streamed else "held", **settings, "eval_splits": list(eval_splits)}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, str]:
    """What differs between two identities, by name, each with its values (``lr 0.003 there, 0.001 here``), for
    the note that a checkpoint is not used: with its values, its settings can be given again to go on from it."""
    return {k: _difference(k, saved.get(k), current.get(k))
            for k in sorted(saved.keys() | current.keys()) if saved.get(k) != current.get(k)}


def _difference(name: str, saved: Any, current: Any) -> str:
    shown = {"rows": f"rows {saved} there, {current} here (--memory-budget decides)",
             "store": f"store {saved} there, {current} here (another store, or other content)"}
    return shown.get(name) or f"{name} {_shown(saved)} there, {_shown(current)} here"


def _replacing(aside: RunState | dict[str, str] | Exception | None) -> str:
    """The note's phrase for the checkpoint of other settings a new one set aside replaces (none: '')."""
    return f"; it replaces the one set aside earlier ({'; '.join(aside.values())})" if isinstance(aside, dict) else ""


def _shown(value: Any) -> str:
    return "none" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


@dataclass
class EpochProgress:
    """The part of an epoch a run has trained: its first ``steps`` batches, with the seeds' summed losses
    (loss times examples) over them and their ``examples``, from which the epoch's mean loss goes on."""

    steps: int
    loss_sums: list[float]
    examples: int


@dataclass
class RunState:
    """A run after ``epoch`` epochs (and ``within`` the next one, when saved between two of its steps).
    ``best[k]``: seed k's best epoch so far ({} before any), with its ``state`` (weights), ``metrics`` and eval
    ``predictions`` (numpy arrays)."""

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    dropout: dict[str, list[torch.Tensor]]
    best_score: list[float]
    waited: list[int]
    best: list[dict[str, Any]]
    history: list[dict[str, Any]]
    frozen: dict[str, Any]
    wall_time_s: float  # spent by this run in the processes that saved the checkpoints so far
    within: EpochProgress | None = None

    @property
    def position(self) -> str:
        """Where the run stands, for the user: "epoch 3", or "batch 120 of epoch 4"."""
        return f"epoch {self.epoch}" if self.within is None else f"batch {self.within.steps} of epoch {self.epoch + 1}"


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers: torch.load's safe mode reads no numpy objects."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value.item() if isinstance(value, np.generic) else value


def _tensors(best: list[dict[str, Any]], to_tensor: bool) -> list[dict[str, Any]]:
    """Predictions as tensors to save (torch.load's safe mode reads no numpy arrays), and back."""
    convert = torch.from_numpy if to_tensor else (lambda t: t.numpy())
    return [{**b, "predictions": {n: convert(p) for n, p in b.get("predictions", {}).items()}} if b else {}
            for b in best]


class Checkpoints:
    """The checkpoint file of one run directory: found and checked at the start, saved between steps."""

    def __init__(self, out: Path, identity: dict[str, Any], every_s: float | None) -> None:
        self.path = Path(out) / CHECKPOINT_NAME
        self.aside = Path(out) / REPLACED_NAME
        self.identity, self.every_s = identity, every_s
        self.last_save = time.monotonic()

    def load(self) -> tuple[RunState | None, str | None]:
        """The saved state if it continues this run, and a note for the user: what is resumed, or why a
        checkpoint found is not used (another run's settings, an unreadable file). (None, None): none found.

        The checkpoint set aside by an earlier rerun (``checkpoint.replaced.pt``) is tried too: rerun with its
        settings after a mistyped one, a run goes on from it, and the two files change places.
        """
        found = self._read(self.path) if self.path.is_file() else None
        if isinstance(found, RunState):
            return found, f"resuming from {self.path}, saved after {found.position}"
        notes = []
        if isinstance(found, Exception):
            notes.append(f"{self.path} cannot be read ({type(found).__name__}); {self._discard(self.path)}")
            found = None
        aside = self._read(self.aside) if self.aside.is_file() else None
        if isinstance(aside, Exception):
            notes.append(f"{self.aside} cannot be read ({type(aside).__name__}); {self._discard(self.aside)}")
            aside = None
        if isinstance(aside, RunState):
            kept = ""
            if found is None:
                os.replace(self.aside, self.path)
            else:  # the two change places: neither is lost
                swap = partial_path(self.aside)
                os.replace(self.path, swap)
                os.replace(self.aside, self.path)
                os.replace(swap, self.aside)
                kept = f"; the checkpoint of other settings it replaces is kept as {self.aside}"
            notes.append(f"resuming from {self.path}, saved after {aside.position} (an earlier rerun had set it "
                         f"aside){kept}")
            return aside, "; ".join(notes)
        if found is None:
            return None, "; ".join([*notes, "starting over"]) if notes else None
        return None, (f"{self.path} was saved by a run with other settings ({'; '.join(found.values())}); "
                      f"starting over{self._set_aside(found, _replacing(aside))}")

    def _read(self, path: Path) -> RunState | dict[str, str] | Exception:
        """The state saved at ``path`` if it continues this run; else what differs, or why it cannot be read."""
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            identity, state = saved["identity"], RunState(**saved["state"])
            if state.within is not None:
                state.within = EpochProgress(**state.within)  # saved as a plain dict (torch.load's safe mode)
        except Exception as error:  # a file of another version or damaged on disk: a run can always start over
            log.debug("checkpoint %s unreadable: %r", path, error)
            return error
        # A setting now known not to change results (an older checkpoint recorded it) is left out of its identity.
        known = {k: v for k, v in identity.items() if k in self.identity or k not in HOW_ONLY}
        changed = differences(known, self.identity)
        if changed:
            return changed
        state.best = _tensors(state.best, to_tensor=False)
        return state

    def skip(self) -> str | None:
        """``--no-resume``: start over. A checkpoint of this run's settings (here or set aside) is discarded, so no
        later run goes on from it; one of other settings is set aside as a run that ignores it would. A note saying
        what was done, or None."""
        read = {path: self._read(path) for path in (self.aside, self.path) if path.is_file()}
        notes = [f"not from {path}: {self._discard(path)}" for path, got in read.items() if not isinstance(got, dict)]
        found, aside = read.get(self.path), read.get(self.aside)
        if isinstance(found, dict):
            notes.append(f"{self.path} was saved by a run with other settings ({'; '.join(found.values())})"
                         f"{self._set_aside(found, _replacing(aside))}")
        return f"--no-resume: starting over, {'; '.join(notes)}" if notes else None

    def _discard(self, path: Path) -> str:
        """Move ``path`` to the name no run reads (kept for a look); the note's phrase saying so."""
        os.replace(path, path.with_name(DISCARDED_NAME))
        return f"it is kept as {path.with_name(DISCARDED_NAME)}, which no run reads"

    def _set_aside(self, found: dict[str, str], replaced: str) -> str:
        """Move the checkpoint found (of the settings ``found`` lists) out of the first save's way, over an earlier
        one set aside; the note's tail saying where it went and whether a run can go on from it."""
        try:
            os.replace(self.path, self.aside)
        except OSError as error:  # a read-only folder fails at the first save anyway, with its own message
            log.warning("cannot move %s aside: %r", self.path, error)
            return ""
        if found.keys() & {"format", "torch"}:
            return f" (it is kept as {self.aside}, though this version cannot go on from it{replaced})"
        return f" (it is kept as {self.aside}: a run with its settings goes on from it{replaced})"

    def due(self, within_epoch: bool = False) -> bool:
        """Whether the run should be saved now: after an epoch, or ``within_epoch`` after a step (never with
        ``every_s`` 0, which saves after each epoch only)."""
        if self.every_s is None or (within_epoch and self.every_s == 0):
            return False
        return time.monotonic() - self.last_save >= self.every_s

    def save(self, state: RunState) -> None:
        """Write ``state`` whole (a crash mid-write leaves the previous checkpoint)."""
        within = None if state.within is None else vars(state.within)
        payload = _plain({**vars(state), "best": _tensors(state.best, to_tensor=True), "within": within})
        buffer = io.BytesIO()
        torch.save({"identity": self.identity, "state": payload}, buffer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, buffer.getvalue())
        self.last_save = time.monotonic()
        log.info("saved %s after %s", self.path, state.position)

    def remove(self) -> None:
        """Once the outputs are written: the checkpoint, and what a save stopped mid-write left."""
        self.path.unlink(missing_ok=True)
        partial_path(self.path).unlink(missing_ok=True)


@dataclass
class SavesWithinEpoch:
    """How an epoch saves its run between two steps: the run's checkpoint file, and the run's state at a point
    of the epoch (built only when a save is due, as it syncs with the device)."""

    checkpoints: Checkpoints
    state_at: Callable[[EpochProgress], RunState]

    def due(self) -> bool:
        return self.checkpoints.due(within_epoch=True)

    def save(self, progress: EpochProgress) -> None:
        self.checkpoints.save(self.state_at(progress))


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load AdamW's state, keeping each group's learning rate in the tensor it had (a recorded step reads the
    rate from that tensor on the device: a loaded one would be another tensor, on the host)."""
    rates = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, rate in zip(optimizer.param_groups, rates):
        if isinstance(rate, torch.Tensor):
            rate.fill_(float(group["lr"]))
            group["lr"] = rate


def best_scores(state: RunState | None, seeds: int) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Each seed's best score, epochs waited since it, and best epoch: a fresh run's, or a checkpoint's."""
    if state is None:
        return np.full(seeds, -np.inf), np.zeros(seeds, dtype=int), [{} for _ in range(seeds)]
    return np.array(state.best_score, dtype=float), np.array(state.waited, dtype=int), state.best
