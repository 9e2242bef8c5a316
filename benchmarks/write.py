"""How fast a pool of writer threads stores shards (zarr's synchronous API against ``write_shards``), how fast
they read back, and how much each codec saves.

Run from the repository root:

    .venv/bin/python benchmarks/write.py [--shards 16] [--writers 1,2] [--codecs none,blosc-zstd] [--values STORE]

Each shard is 3,200 rows of 13 x 768 bfloat16 values (a T5-base side's block, 61 MiB; random normal values),
in inner chunks of the store's size (64 rows here), written by ``--writers`` threads into a fresh array in a
temporary folder under ``bench_out/``. ``--values STORE`` takes the rows instead from the first block of a real
store (its own row shape and inner chunks, 3,200 rows rounded up to whole chunks; a shorter block is repeated):
random values do not compress as activations do. "zarr sync" is
``array[rows] = values`` with zarr's defaults, which ``StoreWriter.write_block`` used before; "write_shards" is
what it uses now (an event loop per writer thread, every given chunk written as is). Both are timed in one
process, alternated. Each array is then read back through zarr's read path by as many threads, each shard
decoded into its place in one array ("read back, zarr": from the page cache; both arrays' reads pooled), and
checked; stage two now reads shard files itself, which ``benchmarks/read.py --zarr`` compares with that path. The last column is the codec's ratio: the shards' raw bytes over their bytes on disk. Appends nothing
to BENCHMARKS.md.
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

import ml_dtypes
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype

from pipeline.store.format import chunk_rows_for, compressor, round_up
from pipeline.store.writer import write_shards

ROWS, STATES, D_MODEL = 3200, 13, 768


def timed_write(values: np.ndarray, codec: str, writers: int, shards: int, how: str,
                folder: Path) -> tuple[float, float, int]:
    """Seconds to write ``shards`` copies of ``values`` into a new array, one shard each, with ``how``; seconds to
    read them back as many threads as wrote them (from the page cache); and the bytes the array takes on disk."""
    rows, *row_shape = values.shape
    array = zarr.create_array(folder / f"{how}.zarr", shape=(rows * shards, *row_shape),
                              chunks=(chunk_rows_for(values[0].nbytes), *row_shape), shards=values.shape,
                              dtype="uint16", fill_value=0, compressors=compressor(codec))

    def write(j: int) -> None:
        shard = slice(j * rows, (j + 1) * rows)
        if how == "zarr sync":
            array[shard] = values
        else:
            write_shards([(array, shard, values)])

    started = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(write, range(shards)))
    seconds = time.perf_counter() - started
    out = np.empty((rows * shards, *row_shape), dtype=values.dtype)
    buffer = default_buffer_prototype().nd_buffer

    def read(j: int) -> None:  # as stage two reads a held split: each shard decoded straight into its place
        part = slice(j * rows, (j + 1) * rows)
        array.get_basic_selection(part, out=buffer.from_numpy_array(out[part]))

    started = time.perf_counter()
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(read, range(shards)))
    read_seconds = time.perf_counter() - started
    if not np.array_equal(out[(shards - 1) * rows :], values):
        raise SystemExit(f"{how}: the last shard does not read back as written")
    disk = sum(f.stat().st_size for f in (folder / f"{how}.zarr").rglob("*") if f.is_file())
    shutil.rmtree(folder / f"{how}.zarr")
    return seconds, read_seconds, disk


def real_rows(store: str) -> np.ndarray:
    """About ROWS rows of a real store's first block (its first side), repeated if the block is shorter."""
    from pipeline.store import CacheStore

    split = CacheStore(store).split("train")
    rows = split.read_block(0, split.sides[0])
    shard_rows = round_up(ROWS, chunk_rows_for(rows[0].nbytes))  # whole inner chunks, as the store's blocks hold
    return np.ascontiguousarray(np.resize(rows, (shard_rows, *rows.shape[1:])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--writers", default="1,2", help="writer thread counts, comma-separated")
    parser.add_argument("--codecs", default="none,blosc-zstd", help="codecs, comma-separated")
    parser.add_argument("--reps", type=int, default=3, help="alternated repetitions; the median is shown")
    parser.add_argument("--values", metavar="STORE", default=None,
                        help="take the rows from this store's first training block, not random values")
    args = parser.parse_args()
    if args.values:
        values, source = real_rows(args.values), f"rows of {args.values}"
    else:
        normal = np.random.default_rng(0).standard_normal((ROWS, STATES, D_MODEL), dtype=np.float32)
        values, source = normal.astype(ml_dtypes.bfloat16).view(np.uint16), "random normal values"
    mib = values.nbytes * args.shards / 2**20
    (REPO / "bench_out").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="write-", dir=REPO / "bench_out"))
    print(f"{args.shards} shards of {values.shape} ({values.nbytes / 2**20:.0f} MiB, {source}), {os.cpu_count()} "
          f"CPUs, zarr {zarr.__version__}; MiB/s of raw rows, median of {args.reps}")
    print("| codec | threads | write: zarr sync | write: write_shards | read back, zarr | raw / on disk |\n"
          "|---|---|---|---|---|---|")
    try:
        for codec in args.codecs.split(","):
            for writers in map(int, args.writers.split(",")):
                times: dict[str, list[float]] = {"zarr sync": [], "write_shards": [], "read": []}
                for rep in range(args.reps):
                    for how in (["zarr sync", "write_shards"] if rep % 2 == 0 else ["write_shards", "zarr sync"]):
                        seconds, read_seconds, disk = timed_write(values, codec, writers, args.shards, how, folder)
                        times[how].append(seconds)
                        times["read"].append(read_seconds)
                rates = " | ".join(f"{mib / statistics.median(t):,.0f}" for t in times.values())
                print(f"| {codec} | {writers} | {rates} | {values.nbytes * args.shards / disk:.3f} |", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
