"""Whole training steps replayed as CUDA graphs, recorded from the eager step itself: no compiler.

An eager step on a GPU is bound by kernel launches: some hundreds of operators forward, backward, clipping and
AdamW, each costing host time, for a side network of a few million parameters. A CUDA graph records the kernels
of one step once and replays them with one launch. torch.compile's reduce-overhead mode does this too
(``--compile --cuda-graphs``), but compiles first: about 30 s for one seed and 100 s for five on an H200, more than
the nine epochs after it save. Recording the eager step runs its Python once more per batch shape, and compiles
nothing.

What is recorded is everything from zeroing the gradients to the optimiser's update (``Recorder`` does the
recording: CUDA graphs on a GPU, a stand-in in the CPU tests). A graph replays fixed shapes at fixed addresses,
so:

- each batch shape (token counts padded to a few buckets: ``pipeline.training.buckets``) gets its own graph, taken
  the second time the shape comes: the first runs eagerly, so that every lazy initialisation (gradients, AdamW's
  state, library handles) happens outside a recording;
- the batch and dropout masks are copied into input buffers the graph reads. Each input is a view at the start of
  one flat buffer per input name, shared by every shape, so the inputs take the largest batch's room once, not once
  a shape (a larger batch than the buffer holds replaces it, and the graphs that read the old one are recorded
  again when their shape comes back);
- the gradients and AdamW's state live outside the graphs and are updated in place, so graphed and eager steps
  (an epoch's smaller last batch) share them; the learning rate is a tensor the schedule fills between steps;
- every graph draws its working memory from one pool: the graphs run one after another, and a step's only
  output, the per-seed losses, is copied out before the next step runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from pipeline.training.network import SideBatch

Step = Callable[[SideBatch, Mapping[str, Tensor]], Tensor]  # a whole training step: batch, masks -> losses (S,)
Shape = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


class Recorder(Protocol):
    """Runs whole steps eagerly, and records them for replay."""

    def eager(self, run: Callable[[], Tensor]) -> Tensor:
        """Run ``run`` once, unrecorded, where recorded steps run (their stream); its result."""

    def record(self, run: Callable[[], Tensor]) -> tuple[Callable[[], None], Tensor]:
        """Record ``run`` and take its step once: (replay, the output that every replay refills)."""


class CudaGraphRecorder:
    """``Recorder`` on a CUDA device: ``torch.cuda.CUDAGraph`` captured on a side stream, one memory pool for all.

    Eager steps run on the capture stream too (torch's recipe for a whole-network capture), each ordered after the
    work already queued on the current stream and before the work queued after it.
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)
        self.pool = torch.cuda.graph_pool_handle()

    def eager(self, run: Callable[[], Tensor]) -> Tensor:
        current = torch.cuda.current_stream(self.stream.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = run()
        current.wait_stream(self.stream)
        return out

    def record(self, run: Callable[[], Tensor]) -> tuple[Callable[[], None], Tensor]:
        graph = torch.cuda.CUDAGraph()
        # thread_local: a streamed split's reader thread may copy to the device while this thread records.
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            out = run()
        graph.replay()  # recording runs nothing: this takes the step
        return graph.replay, out


@dataclass
class _Recorded:
    replay: Callable[[], None]
    losses: Tensor
    inputs: dict[str, Tensor]  # the views the graph reads, by input name


def _inputs(batch: SideBatch, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A step's tensors by name: the batch's fields, then the dropout masks."""
    named = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    named.update({f"mask:{name}": mask for name, mask in masks.items()})
    return {name: t for name, t in named.items() if t is not None}


def _batch_and_masks(inputs: Mapping[str, Tensor]) -> tuple[SideBatch, dict[str, Tensor]]:
    """``_inputs`` inverted."""
    fields = {f.name: inputs.get(f.name) for f in dataclasses.fields(SideBatch)}
    masks = {name.removeprefix("mask:"): t for name, t in inputs.items() if name.startswith("mask:")}
    return SideBatch(**fields), masks


class StepGraphs:
    """A training step, eager the first time a batch shape comes and replayed as a recorded graph after that.

    ``step`` is the whole eager step (zero the gradients in place, forward, backward, clip, update) and must not
    wait for the device: no ``.item()``, no shape that depends on values. ``__call__`` takes the step for one batch
    of the training batch size; ``eager`` one of any other size.
    """

    def __init__(self, step: Step, recorder: Recorder) -> None:
        self.step, self.recorder = step, recorder
        self.buffers: dict[str, Tensor] = {}  # input name -> flat buffer, shared by every shape's graph
        self.graphs: dict[Shape, _Recorded] = {}
        self.seen: set[Shape] = set()
        self.recordings = 0

    def eager(self, batch: SideBatch, masks: Mapping[str, Tensor]) -> Tensor:
        """One step without a graph; the per-seed losses."""
        return self.recorder.eager(lambda: self.step(batch, masks).detach())

    def __call__(self, batch: SideBatch, masks: Mapping[str, Tensor]) -> Tensor:
        """One step, replayed when its shape has been recorded; the per-seed losses (a copy: the graph's own output
        is refilled by the next step)."""
        inputs = _inputs(batch, masks)
        shape: Shape = tuple((name, tuple(t.shape), t.dtype) for name, t in inputs.items())
        recorded = self.graphs.get(shape)
        if recorded is None and shape not in self.seen:
            self.seen.add(shape)
            return self.eager(batch, masks)
        if recorded is None:
            recorded = self._record(shape, inputs)
            return recorded.losses.clone()
        for name, t in inputs.items():
            recorded.inputs[name].copy_(t)
        recorded.replay()
        return recorded.losses.clone()

    def _record(self, shape: Shape, inputs: Mapping[str, Tensor]) -> _Recorded:
        """Record the step for this shape, taking it for ``inputs``."""
        views = {name: self._view(name, t) for name, t in inputs.items()}
        for name, t in inputs.items():
            views[name].copy_(t)
        batch, masks = _batch_and_masks(views)
        replay, losses = self.recorder.record(lambda: self.step(batch, masks).detach())
        self.recordings += 1
        self.graphs[shape] = recorded = _Recorded(replay, losses, views)
        return recorded

    def _view(self, name: str, like: Tensor) -> Tensor:
        """A view shaped as ``like`` at the start of input ``name``'s buffer, which grows if it must; graphs that
        read a replaced buffer are dropped, to be recorded again."""
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < like.numel() or buffer.dtype != like.dtype:
            self.graphs = {s: g for s, g in self.graphs.items() if name not in g.inputs}
            buffer = self.buffers[name] = torch.empty(max(like.numel(), 1), dtype=like.dtype, device=like.device)
        return buffer[: like.numel()].view(like.shape)

