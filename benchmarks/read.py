"""How fast stage two reads a split it holds in memory: every block decoded, checked and joined into one chunk.

Run from the repository root, on any store (the page cache warmed by a first, untimed read):

    .venv/bin/python benchmarks/read.py bench_out/stores/sst2-first20000-all.zarr [--split train] [--reps 5] [--zarr]

It times ``pipeline.training.batches.load_chunk`` over all the split's blocks, which is what ``Trainer``
does before the first epoch when the split fits ``memory_budget`` (then one copy to the device, not timed
here), and prints the median wall time and the rate in GiB/s of stored states. Blocks are read straight from
their shard files (``pipeline.store.shards``); ``--zarr`` also times, alternated in the same process, the same
reads through zarr's own read path, as before that reader. Appends nothing to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from pipeline.store import CacheStore
from pipeline.store.reader import CachedSplit
from pipeline.training.batches import load_chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--split", default="train")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--zarr", action="store_true", help="also time zarr's read path, alternated")
    args = parser.parse_args()
    split = CacheStore(args.store).split(args.split)
    labels = torch.zeros(len(split))
    blocks = list(range(split.num_blocks))
    gib = sum(split.nbytes(side) for side in split.sides) / 2**30
    load_chunk(split, blocks, labels)  # the page cache, not the disk, is what every version then reads from
    ways = ["shard files", "zarr"] if args.zarr else ["shard files"]
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    for rep in range(args.reps):
        for way in (ways if rep % 2 == 0 else ways[::-1]):
            with through_zarr(split, way == "zarr"):
                started = time.perf_counter()
                load_chunk(split, blocks, labels)
                seconds[way].append(time.perf_counter() - started)
    for way, times in seconds.items():
        median = statistics.median(times)
        print(f"{args.store} {args.split}: {len(blocks)} blocks, {gib:.2f} GiB; load_chunk ({way}) median "
              f"{median:.2f} s ({gib / median:.2f} GiB/s) of {args.reps}, {os.cpu_count()} CPUs, "
              f"torch {torch.__version__}")


@contextlib.contextmanager
def through_zarr(split: CachedSplit, enabled: bool) -> Iterator[None]:
    """Reads through zarr's read path: no array has a shard-file reader."""
    if not enabled:
        yield
        return
    readers = split._shard_files
    split._shard_files = {(side, array): None for side in split.sides for array in ("hidden", "token_ids")}
    try:
        yield
    finally:
        split._shard_files = readers


if __name__ == "__main__":
    main()
