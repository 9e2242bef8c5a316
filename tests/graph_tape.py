"""A CPU stand-in for CUDA graphs: what a recorded step does, replayed as a graph would replay it.

``TapeRecorder`` (a ``pipeline.training.graphs.Recorder``) records every ATen operator a step dispatches, with
its arguments, while the step runs once. A replay runs the same operators again on the same tensors, with the
same scalars, and writes each result into the tensor the recording made: as a CUDA graph replays the same
kernels at the same addresses. So a step that reads a Python value when it runs (a float learning rate, a shape
chosen from the data) replays what it read when recorded, as on a GPU, and a test sees it. What a recording may
not do on a GPU, wait for the device (``.item()``, an output whose size depends on values), fails here too.

Graphs that share a memory pool reuse each other's working memory: recording or replaying one overwrites what the
others made. The stand-in fills every other recording's own tensors (intermediates and outputs, not the
parameters, gradients or inputs they write in place) with NaN at each recording and replay, so a result read after
another graph ran reads NaN here, as it would read another graph's numbers on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Operators that wait for the device: a value brought to the host, or an output sized by values.
WAITS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
         "unique_dim", "bincount", "item"}


class _Tape(TorchDispatchMode):
    """Runs each operator and keeps it: (operator, args, kwargs, outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []
        self.made: list[Tensor] = []  # tensors in memory of the recording's own (not views of what it was given)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "profiler":  # record_function markers: no kernel
            return func(*args, **kwargs)
        if func._opname in WAITS:
            raise RuntimeError(f"{func} waits for the device: a CUDA graph cannot record it")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        self.made += [t for t in tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point()
                      and t.untyped_storage().data_ptr() not in given]
        return out


class TapeRecorder:
    """``Recorder`` on the CPU: eager steps as they are, recorded steps replayed from their tape."""

    def __init__(self) -> None:
        self.replays = 0
        self.tapes: list[_Tape] = []  # every recording: they share one pool

    def eager(self, run: Callable[[], Tensor]) -> Tensor:
        return run()

    def record(self, run: Callable[[], Tensor]) -> tuple[Callable[[], None], Tensor]:
        tape = _Tape()
        self._overwrite_all_but(tape)
        with tape:
            out = run()
        self.tapes.append(tape)

        def replay() -> None:
            self.replays += 1
            self._overwrite_all_but(tape)
            with torch.no_grad():
                for func, args, kwargs, recorded in tape.ops:
                    fresh = func(*args, **kwargs)
                    for old, new in zip(tree_leaves(recorded), tree_leaves(fresh)):
                        if isinstance(old, Tensor) and old.data_ptr() != new.data_ptr():
                            old.copy_(new)  # the recorded tensor's memory, as a graph's kernel writes it

        return replay, out

    def _overwrite_all_but(self, running: _Tape) -> None:
        """What sharing the pool does to the other recordings' own tensors when ``running`` runs."""
        with torch.no_grad():
            for tape in self.tapes:
                if tape is not running:
                    for t in tape.made:
                        t.fill_(float("nan"))
