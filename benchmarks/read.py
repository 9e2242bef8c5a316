"""How fast stage two reads a split it holds in memory: every block decoded, checked and joined into one chunk.

Run from the repository root, on any store (the page cache warmed by a first, untimed read):

    .venv/bin/python benchmarks/read.py bench_out/stores/sst2-first20000-all.zarr [--split train] [--reps 5]

It times ``pipeline.training.batches.load_chunk`` over all the split's blocks, which is what ``Trainer``
does before the first epoch when the split fits ``memory_budget`` (then one copy to the device, not timed
here), and prints the median wall time and the rate in GiB/s of stored states. To compare two versions
side by side, run it from each checkout in turn on the same store. Appends nothing to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.store import CacheStore  # noqa: E402
from pipeline.training.batches import load_chunk  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--split", default="train")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    split = CacheStore(args.store).split(args.split)
    labels = torch.zeros(len(split))
    blocks = list(range(split.num_blocks))
    gib = sum(split.nbytes(side) for side in split.sides) / 2**30
    load_chunk(split, blocks, labels)  # the page cache, not the disk, is what every version then reads from
    seconds = []
    for _ in range(args.reps):
        started = time.perf_counter()
        load_chunk(split, blocks, labels)
        seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    print(f"{args.store} {args.split}: {len(blocks)} blocks, {gib:.2f} GiB; load_chunk median {median:.2f} s "
          f"({gib / median:.2f} GiB/s) of {args.reps}, {os.cpu_count()} CPUs, torch {torch.__version__}")


if __name__ == "__main__":
    main()
