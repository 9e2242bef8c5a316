"""Batches of cached states for stage two: held on the training device when they fit, else streamed by block.

Either way the unit is a ``Chunk``: the rows of some blocks packed densely (no shard padding),
kept in the stored dtype (bfloat16 bits are viewed as ``torch.bfloat16`` without a copy) and
gathered one batch at a time, still in that dtype, on the device that holds the chunk; the side
network widens the states to float32 as it normalises them (in one fused kernel under --compile,
and half the bytes into a CUDA graph's input buffer). On CPU that device is
the host (the rows are the store's own buffers); on CUDA a split that fits the budget is copied there
once, and a streamed chunk crosses from pinned host memory with a non-blocking copy on a side stream,
overlapping the previous chunk's compute. One gather path serves both.

A streamed split that fits ``host_budget`` (given for an accelerator) is read from the store once, into pinned
host memory, and each epoch copies its groups of blocks from there: the same chunks, in the same order, as
reading them again, without decoding the store every epoch.
"""

from __future__ import annotations

import copy
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.common.errors import TrainingError
from pipeline.store import STORED_DTYPES, CachedSplit, torch_view
from pipeline.training.network import SideBatch

READ_THREADS = 32  # at most this many blocks decoded at once (and no more than the cores): each reading thread
# decodes its shard on its own (pipeline.store.shards), so the rate grows with the cores


@dataclass
class Chunk:
    """Dense rows of a run of examples: states per side plus where each example's rows are."""

    examples: np.ndarray  # (n,) indices into the split
    labels: torch.Tensor  # (n,)
    states: dict[str, torch.Tensor]  # side -> (rows, layers, d), stored dtype
    starts: dict[str, np.ndarray]  # side -> (n,) first row of each example in states[side]
    counts: dict[str, np.ndarray]  # side -> (n,) rows of each example

    @classmethod
    def from_rows(cls, examples: np.ndarray, labels: torch.Tensor, states: dict[str, torch.Tensor],
                  counts: dict[str, np.ndarray]) -> Chunk:
        """Rows packed densely in example order: each example's first row follows from the counts."""
        starts = {side: np.concatenate([[0], np.cumsum(c)[:-1]]).astype(np.int64) for side, c in counts.items()}
        return cls(examples, labels, states, starts, counts)

    @property
    def device(self) -> torch.device:
        return self.labels.device

    def to(self, device: torch.device, *, non_blocking: bool = False) -> Chunk:
        """The same rows on ``device`` (itself when already there); index arrays stay on the host."""
        if self.device == torch.device(device):
            return self
        return Chunk(self.examples, self.labels.to(device, non_blocking=non_blocking),
                     {side: t.to(device, non_blocking=non_blocking) for side, t in self.states.items()},
                     self.starts, self.counts)

    def pin_memory(self) -> Chunk:
        """Host rows in page-locked memory, so a copy to CUDA can run asynchronously."""
        return Chunk(self.examples, self.labels.pin_memory(),
                     {side: t.pin_memory() for side, t in self.states.items()}, self.starts, self.counts)

    def batch(self, picks: np.ndarray) -> SideBatch:
        """Gather examples ``picks`` (positions in this chunk) in the stored dtype on the chunk's device, tokens
        flattened.

        Index arrays are built on the host (numpy) and sent to a CUDA device from pinned memory with non-blocking
        copies: no step waits for the device (from pageable memory, the driver may wait for the stream to stage it).
        """
        device = self.device
        pinned = device.type == "cuda"

        def tensor(values: np.ndarray) -> torch.Tensor:
            host = torch.from_numpy(values)
            return host.pin_memory().to(device, non_blocking=True) if pinned else host

        fields: dict[str, torch.Tensor | None] = {}
        for side, states in self.states.items():
            counts = self.counts[side][picks]
            starts = self.starts[side][picks]
            if side == "decoder" or counts.max() == 1 and counts.min() == 1:
                fields[side] = states.index_select(0, tensor(starts))
                continue
            index = np.concatenate([np.arange(s, s + c) for s, c in zip(starts, counts)])
            fields["encoder"] = states.index_select(0, tensor(index))
            fields["encoder_segment"] = tensor(np.repeat(np.arange(len(picks)), counts))
            fields["encoder_first"] = tensor(np.concatenate([[0], np.cumsum(counts)[:-1]]))
        return SideBatch(labels=self.labels[tensor(picks)], **fields)


def all_finite(values: torch.Tensor) -> bool:
    """Whether no value is NaN or infinite, from the minimum and maximum alone: a NaN propagates to both and an
    infinity is one of them (17x faster than ``isfinite(values).all()`` on bfloat16, measured, with no temporary)."""
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def read_side(split: CachedSplit, blocks: Sequence[int], side: str, *, pinned: bool = False) -> np.ndarray:
    """One side's rows of ``blocks``, densely in block order, in the stored dtype.

    Each block is decoded straight into its place and checked there, against its checksum (a damaged
    shard raises one line) and for non-finite values, by up to one thread a core: reading, decompression,
    hashing and the check release the GIL, and no block is copied again to join the others. ``pinned``: into
    page-locked memory (CUDA only), which copies to the device can read asynchronously, with no pinned copy made.
    """
    spans = [split.block_rows(j, side) for j in blocks]
    first = np.cumsum([0, *(end - start for start, end in spans)])
    shape, dtype = (int(first[-1]), *split.hidden(side).shape[1:]), np.dtype(STORED_DTYPES[split.dtype])
    if pinned:  # the array's base is the pinned tensor, which stays alive with it
        raw = torch.empty(math.prod(shape) * dtype.itemsize, dtype=torch.uint8, pin_memory=True).numpy()
        raw = raw.view(dtype).reshape(shape)
    else:
        raw = np.empty(shape, dtype=dtype)

    def read(k: int) -> bool:
        part = split.read_block(blocks[k], side, out=raw[first[k] : first[k + 1]])
        return all_finite(torch_view(part, split.dtype))

    workers = min(READ_THREADS, len(blocks), os.cpu_count() or 1)
    if workers <= 1:
        finite = [read(k) for k in range(len(blocks))]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read") as pool:
            finite = list(pool.map(read, range(len(blocks))))
    if not all(finite):
        raise TrainingError(f"non-finite values in {split.name}/{side} block {blocks[finite.index(False)]}; "
                            "run `pipeline verify` on the store and re-extract it")
    return raw


def load_chunk(split: CachedSplit, blocks: Sequence[int], labels: torch.Tensor, *, pinned: bool = False) -> Chunk:
    """Read whole blocks (one shard each per side, ``read_side``) into one dense chunk (``pinned``: its states in
    page-locked memory)."""
    examples = np.concatenate([np.arange(split.block_starts[j], split.block_starts[j + 1]) for j in blocks])
    states, counts = {}, {}
    for side in split.sides:
        off = split.offsets[side][examples]
        counts[side] = off[:, 1] - off[:, 0]
        states[side] = torch_view(read_side(split, blocks, side, pinned=pinned), split.dtype)
    return Chunk.from_rows(examples, labels[examples], states, counts)


class SplitBatches:
    """Yields ``SideBatch``es of a split (or of a subset of its examples) on ``device``, from memory or streamed,
    in a seeded order.

    ``memory_budget`` bounds the rows held at once on ``device`` (the host when it is the CPU): a split
    that fits stays there in the stored dtype for the whole run; a larger one is streamed, from the host's memory
    when it fits ``host_budget`` (``host_held``; the trainer gives one for an accelerator only), else from the store.
    """

    def __init__(self, split: CachedSplit, labels: torch.Tensor, *, memory_budget: int, shuffle_buffer: int = 8,
                 device: torch.device | str = "cpu", host_budget: int = 0) -> None:
        self.split = split
        self.labels = labels
        nbytes = sum(split.nbytes(side) for side in split.sides)
        self.in_memory = nbytes <= memory_budget
        self.host_held = not self.in_memory and nbytes <= host_budget
        self.shuffle_buffer = shuffle_buffer
        self.nbytes = nbytes
        self.device = torch.device(device)
        self._all: Chunk | None = None
        self._host: Chunk | None = None  # every block, in order, in (pinned) host memory: host_held
        self._reads = [0.0]  # seconds spent reading, shared with every subset of this split
        self._copy_seconds = [0.0]  # seconds spent copying held rows to the device, shared likewise
        self.examples: np.ndarray | None = None  # sorted indices into the split; None: every example
        self._keep: np.ndarray | None = None  # (len(split),) bool mask of ``examples``
        self._copies = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __len__(self) -> int:
        return len(self.split) if self.examples is None else len(self.examples)

    @property
    def read_seconds(self) -> float:
        return self._reads[0]

    @property
    def copy_seconds(self) -> float:
        """Seconds the rows held in memory took to reach the device (0 when it is the host)."""
        return self._copy_seconds[0]

    def subset(self, examples: np.ndarray) -> SplitBatches:
        """The same split restricted to ``examples`` (indices into it): shares the rows held in memory."""
        examples = np.unique(np.asarray(examples, dtype=np.int64))
        if len(examples) == 0 or examples[0] < 0 or examples[-1] >= len(self.split):
            raise TrainingError(f"a subset of {self.split.name} needs 1 or more indices in 0..{len(self.split) - 1}")
        self.preload()
        part = copy.copy(self)
        part.examples = examples
        part._keep = np.zeros(len(self.split), dtype=bool)
        part._keep[examples] = True
        return part

    def positions(self, index: np.ndarray) -> np.ndarray:
        """Positions in this (sub)set of split indices that ``epoch`` yields (identity for a whole split)."""
        return index if self.examples is None else np.searchsorted(self.examples, index)

    def example_labels(self) -> np.ndarray:
        """The labels of this (sub)set's examples, in split order."""
        labels = np.asarray(self.split.labels)
        return labels if self.examples is None else labels[self.examples]

    def preload(self) -> None:
        """Read a split that is held in memory (on the device, or on the host) now rather than at its first epoch
        (streamed from the store: nothing)."""
        if self.in_memory and self._all is None:
            chunk = self._timed_load(list(range(self.split.num_blocks)))
            started = time.perf_counter()
            self._all = chunk.to(self.device)  # from pageable memory: the call returns once the copy is done
            self._copy_seconds[0] += time.perf_counter() - started
        elif self.host_held and self._host is None:  # on CUDA decoded straight into pinned memory
            self._host = self._timed_load(list(range(self.split.num_blocks)), pinned=self._copies is not None)

    def _from_host(self, blocks: Sequence[int]) -> Chunk:
        """The chunk ``load_chunk`` would read for ``blocks``, copied from the rows held on the host (each block's
        rows are one contiguous run there) into one dense chunk on the device."""
        host = self._host
        assert host is not None
        starts = np.asarray(self.split.block_starts)
        runs = [(int(starts[j]), int(starts[j + 1])) for j in blocks if starts[j + 1] > starts[j]]
        examples = np.concatenate([np.arange(a, b) for a, b in runs]) if runs else np.zeros(0, dtype=np.int64)
        states, counts = {}, {}
        for side, rows in host.states.items():
            first, count = host.starts[side], host.counts[side]
            spans = [(int(first[a]), int(first[b - 1] + count[b - 1])) for a, b in runs]
            out = torch.empty((sum(end - start for start, end in spans), *rows.shape[1:]), dtype=rows.dtype,
                              device=self.device)
            at = 0
            for start, end in spans:  # from pinned memory: each copy is asynchronous on a CUDA stream
                out[at : at + end - start].copy_(rows[start:end], non_blocking=True)
                at += end - start
            states[side], counts[side] = out, count[examples]
        labels = host.labels[torch.from_numpy(examples)].to(self.device, non_blocking=True)
        return Chunk.from_rows(examples, labels, states, counts)

    def _timed_load(self, blocks: Sequence[int], *, pinned: bool = False) -> Chunk:
        started = time.perf_counter()
        chunk = load_chunk(self.split, blocks, self.labels, pinned=pinned)
        with _lock:
            self._reads[0] += time.perf_counter() - started
        return chunk

    def _streamed(self, blocks: Sequence[int]) -> tuple[Chunk, torch.cuda.Event | None]:
        """A group of blocks on the prefetch thread (``_group``); for CUDA, sent on the copy stream, with the event
        that says it arrived."""
        if self._copies is None:
            return self._group(blocks), None
        with torch.cuda.stream(self._copies):
            chunk = self._group(blocks)
            done = torch.cuda.Event()
            done.record(self._copies)
        return chunk, done

    def _group(self, blocks: Sequence[int]) -> Chunk:
        """A group of blocks on the device: taken from the rows held on the host (host_held), or read from the store
        (for CUDA, pinned first, so that the copy is asynchronous)."""
        if self._host is not None:
            return self._from_host(blocks)
        chunk = self._timed_load(blocks)
        return chunk if self._copies is None else chunk.pin_memory().to(self.device, non_blocking=True)

    def _arrived(self, streamed: tuple[Chunk, torch.cuda.Event | None]) -> Chunk:
        """Make the compute stream wait for a streamed chunk's copy (no host sync) and own its memory."""
        chunk, done = streamed
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            for t in (chunk.labels, *chunk.states.values()):
                t.record_stream(compute)
        return chunk

    def _stream_groups(self, rng: np.random.Generator, shuffle: bool) -> list[list[int]]:
        """The groups of blocks a streamed epoch reads, ``shuffle_buffer`` at a time: the first draws of ``rng``."""
        blocks = np.arange(self.split.num_blocks)
        if self._keep is not None:  # only the blocks that hold an example of the subset
            starts = np.asarray(self.split.block_starts)
            blocks = blocks[[self._keep[starts[j]:starts[j + 1]].any() for j in blocks]]
        if shuffle:
            rng.shuffle(blocks)
        return [[int(j) for j in blocks[i : i + self.shuffle_buffer]] for i in range(0, len(blocks), self.shuffle_buffer)]

    def _group_sizes(self, groups: list[list[int]]) -> list[int]:
        """Examples of the (sub)set in each group of blocks, from the block layout alone (nothing is read)."""
        starts = np.asarray(self.split.block_starts)
        kept = np.arange(len(self.split) + 1) if self._keep is None else np.concatenate([[0], np.cumsum(self._keep)])
        sizes = kept[starts[1:]] - kept[starts[:-1]]  # examples of the (sub)set in each block
        return [int(sizes[group].sum()) for group in groups]

    def num_batches(self, batch_size: int, *, shuffle: bool, seed: int = 0) -> int:
        """How many batches ``epoch`` yields with these arguments, from the block layout alone (nothing is read).

        Streamed, each group of blocks ends in a batch of its own remainder, so an epoch has more batches than
        ``ceil(len / batch_size)``, and the number depends on the group order, hence on ``seed``.
        """
        if self.in_memory:
            return math.ceil(len(self) / batch_size)
        groups = self._stream_groups(np.random.default_rng(seed), shuffle)
        return sum(math.ceil(size / batch_size) for size in self._group_sizes(groups))

    def epoch(self, batch_size: int, *, shuffle: bool, seed: int = 0,
              skip: int = 0) -> Iterator[tuple[np.ndarray, SideBatch]]:
        """(example indices into the split, batch) pairs covering the (sub)set once (``num_batches`` of them).

        ``skip``: leave out the first ``skip`` of those batches, the rest in the same order (a run resumed within
        an epoch); streamed, the groups of blocks that only skipped batches come from are not read.
        """
        rng = np.random.default_rng(seed)
        self.preload()
        if self.in_memory:
            yield from _chunk_batches(self._all, batch_size, rng if shuffle else None, self._keep, skip)
            return
        # Streaming: blocks in a shuffled order, `shuffle_buffer` at a time, the next group read
        # in the background while the current one trains.
        groups = self._stream_groups(rng, shuffle)
        first = 0
        for size in self._group_sizes(groups):
            if skip < math.ceil(size / batch_size):
                break
            if shuffle:  # the draws the group's own shuffle would take: they depend on its size alone
                rng.shuffle(np.arange(size))
            skip -= math.ceil(size / batch_size)
            first += 1
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
            upcoming: Future | None = pool.submit(self._streamed, groups[first]) if first < len(groups) else None
            for g in range(first, len(groups)):
                chunk = self._arrived(upcoming.result())
                upcoming = pool.submit(self._streamed, groups[g + 1]) if g + 1 < len(groups) else None
                yield from _chunk_batches(chunk, batch_size, rng if shuffle else None, self._keep,
                                          skip if g == first else 0)


_lock = threading.Lock()


def _chunk_batches(
    chunk: Chunk, batch_size: int, rng: np.random.Generator | None, keep: np.ndarray | None = None, skip: int = 0
) -> Iterator[tuple[np.ndarray, SideBatch]]:
    order = np.arange(len(chunk.examples)) if keep is None else np.flatnonzero(keep[chunk.examples])
    if rng is not None:
        rng.shuffle(order)
    for i in range(skip * batch_size, len(order), batch_size):
        picks = order[i : i + batch_size]
        yield chunk.examples[picks], chunk.batch(picks)
