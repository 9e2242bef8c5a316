"""How fast a pool of writer threads stores shards: zarr's synchronous API against ``write_shards``.

Run from the repository root:

    .venv/bin/python benchmarks/write.py [--shards 16] [--writers 1,2] [--codecs none,blosc-zstd]

Each shard is 3,200 rows of 13 x 768 bfloat16 values (a T5-base side's block, 61 MiB; random normal values,
which compress about as real activations do), in 64-row chunks, written by ``--writers`` threads into a fresh
array in a temporary folder under ``bench_out/``. "zarr sync" is ``array[rows] = values`` with zarr's defaults,
which ``StoreWriter.write_block`` used before; "write_shards" is what it uses now (an event loop per writer
thread, every given chunk written as is). Both are timed in one process, alternated, and read back to check.
Appends nothing to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import zarr  # noqa: E402

from pipeline.store.format import compressor  # noqa: E402
from pipeline.store.writer import write_shards  # noqa: E402

ROWS, STATES, D_MODEL, CHUNK_ROWS = 3200, 13, 768, 64


def timed_write(values: np.ndarray, codec: str, writers: int, shards: int, how: str, folder: Path) -> float:
    """Seconds to write ``shards`` copies of ``values`` into a new array, one shard each, with ``how``."""
    array = zarr.create_array(folder / f"{how}.zarr", shape=(ROWS * shards, STATES, D_MODEL),
                              chunks=(CHUNK_ROWS, STATES, D_MODEL), shards=(ROWS, STATES, D_MODEL),
                              dtype="uint16", fill_value=0, compressors=compressor(codec))

    def write(j: int) -> None:
        rows = slice(j * ROWS, (j + 1) * ROWS)
        if how == "zarr sync":
            array[rows] = values
        else:
            write_shards([(array, rows, values)])

    started = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(write, range(shards)))
    seconds = time.perf_counter() - started
    if not np.array_equal(array[(shards - 1) * ROWS :], values):
        raise SystemExit(f"{how}: the last shard does not read back as written")
    shutil.rmtree(folder / f"{how}.zarr")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--writers", default="1,2", help="writer thread counts, comma-separated")
    parser.add_argument("--codecs", default="none,blosc-zstd", help="codecs, comma-separated")
    parser.add_argument("--reps", type=int, default=3, help="alternated repetitions; the median is shown")
    args = parser.parse_args()
    normal = np.random.default_rng(0).standard_normal((ROWS, STATES, D_MODEL), dtype=np.float32)
    values = normal.astype(ml_dtypes.bfloat16).view(np.uint16)
    mib = values.nbytes * args.shards / 2**20
    (REPO / "bench_out").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="write-", dir=REPO / "bench_out"))
    print(f"{args.shards} shards of {values.nbytes / 2**20:.0f} MiB, {os.cpu_count()} CPUs, zarr {zarr.__version__}; "
          f"MiB/s, median of {args.reps}")
    print("| codec | writers | zarr sync | write_shards |\n|---|---|---|---|")
    try:
        for codec in args.codecs.split(","):
            for writers in map(int, args.writers.split(",")):
                times: dict[str, list[float]] = {"zarr sync": [], "write_shards": []}
                for rep in range(args.reps):
                    for how in (list(times) if rep % 2 == 0 else list(times)[::-1]):
                        times[how].append(timed_write(values, codec, writers, args.shards, how, folder))
                rates = [f"{mib / statistics.median(t):,.0f}" for t in times.values()]
                print(f"| {codec} | {writers} | {rates[0]} | {rates[1]} |", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
