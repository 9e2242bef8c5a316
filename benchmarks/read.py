"""How fast stage two reads a split it holds in memory: every block decoded, checked and joined into one chunk.

Run from the repository root, on any store (the page cache warmed by a first, untimed read):

    .venv/bin/python benchmarks/read.py bench_out/stores/sst2-first20000-all.zarr [--split train] [--reps 5]

It times ``pipeline.training.batches.load_chunk`` over all the split's blocks, which is what ``Trainer``
does before the first epoch when the split fits ``memory_budget`` (then one copy to the device, not timed
here), and prints the median wall time and the rate in GiB/s of stored states. To compare two versions
side by side, run it from each checkout in turn on the same store. ``--own-loops`` also times, alternated in
the same process, a trial way of decoding (each reading thread on an event loop of its own). Appends nothing
to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.store import CacheStore  # noqa: E402
from pipeline.store.writer import run_on_own_loop  # noqa: E402
from pipeline.training.batches import load_chunk  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--split", default="train")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--own-loops", action="store_true",
                        help="also time decoding on per-thread event loops (a trial, alternated with zarr's path)")
    args = parser.parse_args()
    split = CacheStore(args.store).split(args.split)
    labels = torch.zeros(len(split))
    blocks = list(range(split.num_blocks))
    gib = sum(split.nbytes(side) for side in split.sides) / 2**30
    load_chunk(split, blocks, labels)  # the page cache, not the disk, is what every version then reads from
    ways = ["zarr sync", "own loops"] if args.own_loops else ["zarr sync"]
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    for rep in range(args.reps):
        for way in (ways if rep % 2 == 0 else ways[::-1]):
            with decoding_on_own_loops(way == "own loops"):
                started = time.perf_counter()
                load_chunk(split, blocks, labels)
                seconds[way].append(time.perf_counter() - started)
    for way, times in seconds.items():
        median = statistics.median(times)
        print(f"{args.store} {args.split}: {len(blocks)} blocks, {gib:.2f} GiB; load_chunk ({way}) median "
              f"{median:.2f} s ({gib / median:.2f} GiB/s) of {args.reps}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}")


@contextlib.contextmanager
def decoding_on_own_loops(enabled: bool) -> Iterator[None]:
    """A trial, not the pipeline's code: each reading thread decodes its shard on an event loop of its own
    instead of zarr's one shared loop thread (as ``write_shards`` writes). Decoding into a given array has no
    public async form in zarr 3.1, so this calls the private ``AsyncArray._get_selection``."""
    if not enabled:
        yield
        return
    from zarr.core.array import Array
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.indexing import BasicIndexer

    synchronous = Array.get_basic_selection

    def own_loop(self: Array, selection: Any = Ellipsis, *, out: Any = None, **kwargs: Any) -> Any:
        indexer = BasicIndexer(selection, self.shape, self.metadata.chunk_grid)
        return run_on_own_loop(lambda: self.async_array._get_selection(indexer, out=out,
                                                                        prototype=default_buffer_prototype()))

    Array.get_basic_selection = own_loop
    try:
        yield
    finally:
        Array.get_basic_selection = synchronous


if __name__ == "__main__":
    main()
