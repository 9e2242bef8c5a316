"""The store's format: layout, constants, block arithmetic, checksums and the bfloat16 helpers.

Layout (per split group, e.g. ``train/``)::

    labels            (n,)            int64 class index (-1 unlabeled) or float32 score (nan unlabeled)
    ids               (n,)            int64 GLUE idx
    block_starts      (n_blocks + 1,) example boundaries of the blocks
    checksums         (n_blocks, c)   uint64 xxh3-64 of each column's used rows in the block (column
                                      names in the array's attributes), written with the block's data
    blocks_done       (n_blocks,)     uint8, one chunk per block: set only after the block's data and
                                      checksums are written
    <side>/hidden     (n_blocks * capacity, layers, d)   bf16 bits as uint16, or float16/float32
    <side>/offsets    (n, 2)          [start, end) rows of each example in <side>/hidden
    <side>/lengths    (n,)            token count of each example before any pooling
    <side>/token_ids  (n_blocks * capacity,)  int32 (per-token sides only)

The split group's attributes hold the checksums of its per-example arrays (labels, ids, block_starts,
offsets, lengths: ``EXAMPLE_SUMS``), and the root's ``label_rows`` array its own, checked whenever they are read.

``side`` is ``encoder`` and/or ``decoder``. Block j owns rows [j * capacity, (j + 1) * capacity) of
every side array, which is exactly one shard: a writer owns whole shards, so a resumed or parallel
run never rewrites another block's shard, and a block written whole needs no read-modify-write.
Rows past a block's last example are never stored (empty inner chunks are skipped), so nothing
is padded on disk beyond the tail of one inner chunk per block. The root group's attributes hold
the metadata record (``pipeline.store.meta``) under ``ATTRS_KEY``.

Format history: version 1 had no checksums and no data identity; version 2 adds both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 2
ATTRS_KEY = "read_pipeline"
SIDES = ("encoder", "decoder")
STORED_DTYPES = {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}
TARGET_SHARD_BYTES = 128 * 2**20  # a few large files: DVC hashes and pushes every file
TARGET_CHUNK_BYTES = 2 * 2**20
CHECKSUM = "xxh3_64"  # ~10 GB/s: a few per cent of the time a shard takes to decompress
EXAMPLE_SUMS = "example_checksums"  # a split group's attribute: per-example array path -> ``checksum_hex``


def fingerprint(content: Mapping[str, Any]) -> str:
    """A hash of a JSON-able mapping (sorted keys, so key order is moot)."""
    blob = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def compressor(name: str) -> list[Any]:
    """The lossless codec for hidden states; 'none' skips compression (it gains little on activations)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "none":
        return []
    if name == "zstd":
        return [ZstdCodec(level=3)]
    if name == "blosc-zstd":
        return [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]
    if name == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")]
    raise ValueError(f"unknown codec {name!r} (ExtractConfig.codec lists the choices)")


# ---- checksums and data identity ---------------------------------------------------------------


def is_remote(store: str) -> bool:
    """Whether a store path is a URL (``s3://...``, read and written through fsspec) rather than a local folder."""
    return "://" in store


def lock_path(store: str) -> Path | None:
    """The extraction lock beside a local store (``<store>.lock``): every extraction holds it while it runs, a
    whole one alone and ``--part`` processes together, so readers can tell a store still being written. None
    for a remote store, which has no lock."""
    return None if is_remote(store) else Path(str(Path(store).resolve()) + ".lock")


def readers_lock_path(store: str) -> Path | None:
    """The lock beside a local store (``<store>.readers.lock``) that training runs hold shared while they read it,
    and removing the store takes alone, so that a store is never replaced under a run reading it."""
    return None if is_remote(store) else Path(str(Path(store).resolve()) + ".readers.lock")


def attrs_lock_path(store: str) -> Path | None:
    """The lock beside a local store (``<store>.attrs.lock``) that a writer holds for the moment it creates the
    store or a split or rewrites the root attributes, so that ``--part`` processes never interleave those."""
    return None if is_remote(store) else Path(str(Path(store).resolve()) + ".attrs.lock")


def checksum(rows: np.ndarray) -> int:
    """The checksum of rows as written (their bytes, C order): catches a missing, truncated or altered shard."""
    import xxhash

    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(rows).reshape(-1).view(np.uint8))


def checksum_hex(values: np.ndarray) -> str:
    """``checksum`` as 16 hex digits, for a JSON attribute (readers elsewhere may not hold 64-bit integers)."""
    return f"{checksum(values):016x}"


def example_arrays(labels: np.ndarray, ids: np.ndarray, plan: BlockPlan,
                   lengths: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A split's per-example arrays, by path in its group, exactly as written when the split is created.

    They are small and written whole, so their checksums (``EXAMPLE_SUMS``, in the split group's attributes) are
    checked every time a split is opened: a chunk of them lost reads back as the fill value, zeros, which would
    otherwise train on wrong labels with no error.
    """
    arrays = {"labels": labels, "ids": ids.astype(np.int64), "block_starts": plan.block_starts}
    for side, counts in lengths.items():
        arrays[f"{side}/offsets"] = plan.offsets[side]
        arrays[f"{side}/lengths"] = counts.astype(np.int64)
    return arrays


def checksum_columns(per_token: Mapping[str, bool]) -> list[str]:
    """The arrays a block's checksums cover, in column order: every side's hidden, and token ids."""
    columns = []
    for side in SIDES:
        if side in per_token:
            columns.append(f"{side}/hidden")
            if per_token[side]:
                columns.append(f"{side}/token_ids")
    return columns


def examples_hash(texts: Sequence[Mapping[str, str]], labels: np.ndarray, ids: np.ndarray) -> str:
    """A hash of a split's examples in order (texts, labels, ids): the data part of a store's identity."""
    digest = hashlib.sha256()
    for example in texts:
        digest.update(json.dumps(example, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    for values in (np.asarray(labels), np.asarray(ids, dtype=np.int64)):
        digest.update(values.dtype.str.encode())
        digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


# ---- blocks ------------------------------------------------------------------------------------


def row_bytes(num_states: int, d_model: int, dtype: str) -> int:
    return num_states * d_model * np.dtype(STORED_DTYPES[dtype]).itemsize


def chunk_rows_for(bytes_per_row: int) -> int:
    """Inner chunk rows: a power of two near TARGET_CHUNK_BYTES (the unit a reader decompresses)."""
    rows = max(1, TARGET_CHUNK_BYTES // bytes_per_row)
    return 1 << (rows.bit_length() - 1)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class BlockPlan:
    """How a split's examples are cut into blocks, and where each example's rows go."""

    block_starts: np.ndarray  # (n_blocks + 1,) example boundaries
    capacity: dict[str, int]  # rows per block, per side (a multiple of the side's chunk rows)
    chunk_rows: dict[str, int]
    offsets: dict[str, np.ndarray]  # side -> (n, 2) [start, end) rows

    @property
    def num_blocks(self) -> int:
        return len(self.block_starts) - 1


def plan_blocks(rows: dict[str, np.ndarray], limits: dict[str, int], chunk_rows: dict[str, int]) -> BlockPlan:
    """Cut examples, in order, into blocks that fit every side's row limit.

    ``rows[side][i]`` is how many rows example i takes on that side (its token count, or 1).
    """
    n = len(next(iter(rows.values())))
    for side, per_example in rows.items():
        if n and int(per_example.max()) > limits[side]:
            raise ValueError(f"an example needs {int(per_example.max())} rows on {side}; the block limit is {limits[side]}")
    starts = [0]
    used = {side: 0 for side in rows}
    for i in range(n):
        if any(used[s] + int(rows[s][i]) > limits[s] for s in rows):
            starts.append(i)
            used = {side: 0 for side in rows}
        for side in rows:
            used[side] += int(rows[side][i])
    starts.append(n)
    block_starts = np.asarray(starts, dtype=np.int64)
    capacity = {side: round_up(limits[side], chunk_rows[side]) for side in rows}
    offsets: dict[str, np.ndarray] = {}
    for side, per_example in rows.items():
        out = np.zeros((n, 2), dtype=np.int64)
        for j in range(len(block_starts) - 1):
            lo, hi = block_starts[j], block_starts[j + 1]
            ends = j * capacity[side] + np.cumsum(per_example[lo:hi])
            out[lo:hi, 1] = ends
            out[lo:hi, 0] = ends - per_example[lo:hi]
        offsets[side] = out
    return BlockPlan(block_starts, capacity, dict(chunk_rows), offsets)


def block_layout(
    num_states: Mapping[str, int], d_model: int, dtype: str, *, per_token: Mapping[str, bool],
    max_length: int, block_tokens: int | None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Rows per block (the shard) and per inner chunk, for each side.

    ``block_tokens`` None aims at TARGET_SHARD_BYTES a shard (at least one longest example).
    One-row-per-example sides hold as many examples as the per-token side's block does.
    """
    limits, chunks = {}, {}
    for side, states in num_states.items():
        per_row = row_bytes(states, d_model, dtype)
        tokens = block_tokens or max(max_length, TARGET_SHARD_BYTES // per_row)
        chunks[side] = min(chunk_rows_for(per_row), 1 << (tokens.bit_length() - 1))
        limits[side] = round_up(tokens, chunks[side]) if per_token[side] else tokens
    if any(per_token.values()):
        tok = max(limits[s] for s in limits if per_token[s])
        for side in limits:
            if not per_token[side]:
                limits[side] = tok
    for side in limits:
        chunks[side] = min(chunks[side], limits[side])
    return limits, chunks


def block_rows(block_starts: np.ndarray, offsets: np.ndarray, block: int) -> tuple[int, int]:
    """The [start, end) rows a block's examples use on one side (its used part of the shard)."""
    lo, hi = int(block_starts[block]), int(block_starts[block + 1])
    if hi <= lo:
        return 0, 0
    return int(offsets[lo, 0]), int(offsets[hi - 1, 1])


def keeps_every_token(side: str, tokens: str) -> bool:
    """Whether a side holds one row per token: the encoder side unless pooled (decoder sides keep one position)."""
    return side == "encoder" and tokens == "all"


# ---- the stored dtype: bfloat16 is kept as its uint16 bits -----------------------------------


def logical_view(values: np.ndarray | torch.Tensor, dtype: str | None = None) -> np.ndarray:
    """Values as numpy in their logical dtype, without a copy (bf16 as ``ml_dtypes.bfloat16``).

    ``values`` is either stored rows (give their logical ``dtype``: bf16 bits are uint16) or a CPU
    torch tensor (its own dtype decides).
    """
    if not isinstance(values, np.ndarray):
        import torch

        if values.dtype != torch.bfloat16:
            return values.numpy()
        values, dtype = values.view(torch.int16).numpy(), "bfloat16"
    if dtype == "bfloat16":
        import ml_dtypes

        return values.view(ml_dtypes.bfloat16)
    return values


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows -> float32; bf16 bits widen exactly by a 16-bit shift."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def torch_view(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored rows -> a torch tensor in the logical dtype, sharing memory (bf16 bits viewed)."""
    import torch

    if dtype == "bfloat16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(raw)


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a stored dtype's logical values."""
    import torch

    return getattr(torch, dtype)


def stored_view(values: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU tensor in the logical dtype -> the stored rows (bf16 as uint16 bits), sharing memory."""
    import torch

    if dtype == "bfloat16":
        return values.view(torch.int16).numpy().view(np.uint16)
    return values.numpy()
