"""The activation store: one Zarr v3 group per task, stage one's output and stage two's only input.

Layout (per split group, e.g. ``train/``)::

    labels            (n,)            int64 class index (-1 unlabeled) or float32 score (nan unlabeled)
    ids               (n,)            int64 GLUE idx
    block_starts      (n_blocks + 1,) example boundaries of the blocks
    blocks_done       (n_blocks,)     uint8, one chunk per block: set only after the block's data is written
    <side>/hidden     (n_blocks * capacity, layers, d)   bf16 bits as uint16, or float16/float32
    <side>/offsets    (n, 2)          [start, end) rows of each example in <side>/hidden
    <side>/lengths    (n,)            token count of each example before any pooling
    <side>/token_ids  (n_blocks * capacity,)  int32 (per-token stores only)

``side`` is ``encoder`` and/or ``decoder``. Block j owns rows [j * capacity, (j + 1) * capacity) of
every side array, which is exactly one shard: a writer owns whole shards, so a resumed or parallel
run never rewrites another block's shard, and a block written whole needs no read-modify-write.
Rows past a block's last example are never stored (empty inner chunks are skipped), so nothing
is padded on disk beyond the tail of one inner chunk per block.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pipeline.errors import StoreCorruptError, StoreFormatError, StoreIncompleteError, StoreMismatchError

FORMAT_VERSION = 1
ATTRS_KEY = "read_pipeline"
SIDES = ("encoder", "decoder")
STORED_DTYPES = {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}
TARGET_SHARD_BYTES = 128 * 2**20  # a few large files: DVC hashes and pushes every file
TARGET_CHUNK_BYTES = 2 * 2**20


def fingerprint(content: dict[str, Any]) -> str:
    """A hash of everything that decides the store's content (sorted JSON, so key order is moot)."""
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
    raise ValueError(f"unknown codec {name!r}; expected zstd, blosc-zstd or none")


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


class StoreWriter:
    """Creates or reopens a store, checks its fingerprint, and writes whole blocks."""

    def __init__(self, path: str | Path, meta: dict[str, Any], *, overwrite: bool = False) -> None:

        self.path = str(path)
        self.meta = meta
        self.lock = _store_lock(self.path)
        with self.lock:
            self.group = self._open_or_create(meta, overwrite)

    def _open_or_create(self, meta: dict[str, Any], overwrite: bool) -> Any:
        import zarr

        local = Path(self.path)
        if overwrite and "://" not in self.path and local.exists():
            shutil.rmtree(local)
        try:
            group = zarr.open_group(self.path, mode="r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            group = None
        except Exception as exc:
            raise StoreCorruptError(f"{self.path} exists but is not a readable Zarr group ({exc}); "
                                    "remove it or pass --overwrite") from exc
        if group is None:
            if local.exists() and any(local.iterdir()):
                raise StoreMismatchError(f"{self.path} exists and is not a store; remove it or pass --overwrite")
            group = zarr.open_group(self.path, mode="w")
            group.attrs[ATTRS_KEY] = {**meta, "splits": {}}
        else:
            old = group.attrs.get(ATTRS_KEY)
            if not old or old.get("fingerprint") != meta["fingerprint"]:
                raise StoreMismatchError(
                    f"{self.path} was made with other settings (fingerprint {old and old.get('fingerprint')}, "
                    f"now {meta['fingerprint']}); pass --overwrite to replace it or choose another --out"
                )
        return group

    # ---- splits -------------------------------------------------------------------------------
    def split_ready(self, split: str) -> bool:
        """True if the split's arrays were fully created before (a crash during creation redoes it)."""
        info = self.group.attrs[ATTRS_KEY]["splits"].get(split)
        return bool(info and info.get("created"))

    def ensure_split(self, split: str, **arrays: Any) -> None:
        """Create the split's arrays unless an earlier run (or another --part) already did.

        The check reads the attributes as they are on disk *under the lock*: a group opened
        earlier caches them, and a part acting on that stale view would delete and recreate a
        split another part is already writing into.
        """
        with self.lock:
            self.group = zarr_reopen(self.path)
            if not self.split_ready(split):
                self.create_split(split, **arrays)

    def ensure_array(self, name: str, data: np.ndarray) -> None:
        """A small root array written once (e.g. label_rows), whichever part comes first."""
        with self.lock:
            self.group = zarr_reopen(self.path)
            if name not in self.group:
                self.group.create_array(name, data=data)

    def create_split(
        self,
        split: str,
        *,
        labels: np.ndarray,
        ids: np.ndarray,
        plan: BlockPlan,
        lengths: dict[str, np.ndarray],
        num_states: dict[str, int],
        d_model: int,
        dtype: str,
        codec: str,
        token_ids: bool,
    ) -> None:
        if split in self.group:
            del self.group[split]
        g = self.group.create_group(split)
        g.create_array("labels", data=labels)
        g.create_array("ids", data=ids.astype(np.int64))
        g.create_array("block_starts", data=plan.block_starts)
        g.create_array("blocks_done", shape=(plan.num_blocks,), chunks=(1,), dtype="uint8", fill_value=0)
        for side, states in num_states.items():
            cap, rows = plan.capacity[side], plan.chunk_rows[side]
            total = plan.num_blocks * cap
            s = g.create_group(side)
            s.create_array(
                "hidden", shape=(total, states, d_model), chunks=(rows, states, d_model),
                shards=(cap, states, d_model), dtype=STORED_DTYPES[dtype], fill_value=0,
                compressors=compressor(codec), dimension_names=("row", "layer", "dim"),
            )
            s.create_array("offsets", data=plan.offsets[side])
            s.create_array("lengths", data=lengths[side].astype(np.int64))
            if token_ids:
                s.create_array("token_ids", shape=(total,), chunks=(rows,), shards=(cap,), dtype="int32",
                               fill_value=-1, compressors=compressor("zstd"))
        self._update_split(split, {
            "created": True, "num_examples": int(len(labels)), "num_blocks": plan.num_blocks,
            "num_tokens": {side: int(lengths[side].sum()) for side in num_states},
            "num_rows": {side: int((plan.offsets[side][:, 1] - plan.offsets[side][:, 0]).sum()) for side in num_states},
            "complete": False,
        })

    def _update_split(self, split: str, values: dict[str, Any]) -> None:
        with self.lock:  # read-modify-write of the root attributes: one process at a time
            self.group = zarr_reopen(self.path)
            attrs = dict(self.group.attrs[ATTRS_KEY])
            splits = dict(attrs.get("splits", {}))
            splits[split] = {**splits.get(split, {}), **values}
            attrs["splits"] = splits
            self.group.attrs[ATTRS_KEY] = attrs

    def done_blocks(self, split: str) -> np.ndarray:
        return np.asarray(self.group[split]["blocks_done"][:], dtype=bool)

    def write_block(self, split: str, block: int, hidden: dict[str, np.ndarray], token_ids: dict[str, np.ndarray]) -> None:
        """Write one block's full shards, then (only then) mark it done."""
        g = self.group[split]
        for side, data in hidden.items():
            cap = data.shape[0]
            g[side]["hidden"][block * cap : (block + 1) * cap] = data
            if side in token_ids and "token_ids" in g[side]:
                g[side]["token_ids"][block * cap : (block + 1) * cap] = token_ids[side]
        g["blocks_done"][block] = 1

    def mark_complete(self, split: str) -> bool:
        """Record completion if every block is written (by this or any other part)."""
        with self.lock:
            if self.done_blocks(split).all():
                self._update_split(split, {"complete": True})
                return True
            return False


def zarr_reopen(path: str) -> Any:
    """The group as it is on disk now (another --part may have changed its attributes)."""
    import zarr

    return zarr.open_group(path, mode="r+")


def _store_lock(path: str) -> Any:
    """A lock file beside a local store, so several --part processes create and annotate it in turn.

    Remote (fsspec) stores get no lock: start part 0 first there, and let it create the splits.
    """
    import contextlib

    if "://" in path:
        return contextlib.nullcontext()
    from filelock import FileLock

    local = Path(path).resolve()
    local.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(local) + ".lock")


# ---- reading ---------------------------------------------------------------------------------


def logical_view(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows in their logical dtype without a copy (bf16 bits as ml_dtypes.bfloat16)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return raw.view(ml_dtypes.bfloat16)
    return raw


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows -> float32; bf16 bits widen exactly by a 16-bit shift."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


class CachedSplit:
    """One split of a store: labels, offsets and block reads, without the backbone."""

    def __init__(self, group: Any, name: str, dtype: str) -> None:
        self.group = group
        self.name = name
        self.dtype = dtype
        self.labels = np.asarray(group["labels"][:])
        self.ids = np.asarray(group["ids"][:])
        self.block_starts = np.asarray(group["block_starts"][:])
        self.sides = [s for s in SIDES if s in group]
        self.offsets = {s: np.asarray(group[s]["offsets"][:]) for s in self.sides}
        self.lengths = {s: np.asarray(group[s]["lengths"][:]) for s in self.sides}
        self.capacity = {s: int(group[s]["hidden"].shards[0]) for s in self.sides}

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_blocks(self) -> int:
        return len(self.block_starts) - 1

    def blocks_done(self) -> np.ndarray:
        return np.asarray(self.group["blocks_done"][:], dtype=bool)

    def hidden(self, side: str) -> Any:
        return self.group[side]["hidden"]

    def read_block(self, block: int, side: str) -> np.ndarray:
        """The stored rows of one block (used rows only), in the stored dtype: one shard read."""
        lo, hi = self.block_starts[block], self.block_starts[block + 1]
        start = int(self.offsets[side][lo, 0]) if hi > lo else 0
        end = int(self.offsets[side][hi - 1, 1]) if hi > lo else 0
        return np.asarray(self.hidden(side)[start:end])

    def nbytes(self, side: str) -> int:
        """Bytes of this side's used rows once in memory, in the stored dtype."""
        arr = self.hidden(side)
        rows = int((self.offsets[side][:, 1] - self.offsets[side][:, 0]).sum())
        return rows * int(np.prod(arr.shape[1:])) * arr.dtype.itemsize


class CacheStore:
    """A finished (or in-progress) store opened read-only."""

    def __init__(self, path: str | Path) -> None:
        import zarr

        self.path = str(path)
        if "://" not in self.path and not Path(self.path).exists():
            raise FileNotFoundError(f"no store at {self.path}; run `pipeline extract` first")
        try:
            self.group = zarr.open_group(self.path, mode="r")
        except Exception as exc:
            raise StoreCorruptError(f"{self.path} is not a Zarr group ({exc}); rerun `pipeline extract`") from exc
        meta = self.group.attrs.get(ATTRS_KEY)
        if not meta:
            raise StoreFormatError(f"{self.path} is a Zarr group but not a READ activation store (no '{ATTRS_KEY}' attributes)")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreFormatError(
                f"{self.path} has store format version {version}; this software reads version {FORMAT_VERSION}. "
                "Re-extract it with this version (`pipeline extract ... --overwrite`)"
            )
        self.meta: dict[str, Any] = meta

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def dtype(self) -> str:
        return self.meta["extraction"]["dtype"]

    @property
    def splits(self) -> list[str]:
        return [s for s in self.meta.get("splits", {}) if s in self.group]

    def split(self, name: str) -> CachedSplit:
        if name not in self.splits:
            raise StoreIncompleteError(
                f"{self.path} has no split {name!r} (it has {', '.join(self.splits) or 'none'}); "
                f"run `pipeline extract ... --splits {name}`"
            )
        return CachedSplit(self.group[name], name, self.dtype)

    def label_rows(self) -> np.ndarray | None:
        return np.asarray(self.group["label_rows"][:]) if "label_rows" in self.group else None

    def blocks_missing(self) -> dict[str, str]:
        """Splits with blocks still to write, as 'done/total' (empty when the store is complete)."""
        missing = {}
        for name in self.splits:
            done = self.split(name).blocks_done()
            if not done.all():
                missing[name] = f"{int(done.sum())}/{len(done)}"
        return missing

    def completion_message(self) -> str:
        """One line for the end of an extraction: complete, or which blocks other parts still owe."""
        missing = self.blocks_missing()
        if not missing:
            return f"store complete: {self.path}"
        shown = ", ".join(f"{name} {blocks} blocks" for name, blocks in missing.items())
        return f"this part is done; {self.path} is not complete yet ({shown}): it completes when every --part has run"

    def require_complete(self, splits: Iterable[str]) -> None:
        for name in splits:
            split = self.split(name)
            done = split.blocks_done()
            if not done.all():
                raise StoreIncompleteError(
                    f"{self.path}: split {name!r} is incomplete ({int(done.sum())}/{len(done)} blocks written); "
                    "rerun the same `pipeline extract` command to finish it"
                )

    def disk_bytes(self) -> int:
        if "://" in self.path:
            return -1
        return sum(f.stat().st_size for f in Path(self.path).rglob("*") if f.is_file())

    def file_count(self) -> int:
        if "://" in self.path:
            return -1
        return sum(1 for f in Path(self.path).rglob("*") if f.is_file())


def verify_store(path: str | Path) -> list[str]:
    """Every problem found: missing blocks, non-finite values, inconsistent metadata. [] = healthy."""
    store = CacheStore(path)
    problems: list[str] = []
    content = store.meta.get("content")
    if content is None or fingerprint(content) != store.fingerprint:
        problems.append("fingerprint does not match the recorded settings")
    for name in store.splits:
        split = store.split(name)
        info = store.meta["splits"].get(name, {})
        n = len(split)
        if info.get("num_examples") != n or len(split.ids) != n:
            problems.append(f"{name}: {n} labels but metadata says {info.get('num_examples')} examples")
        if split.block_starts[0] != 0 or split.block_starts[-1] != n or np.any(np.diff(split.block_starts) < 0):
            problems.append(f"{name}: block boundaries do not cover the {n} examples")
        done = split.blocks_done()
        if not done.all():
            problems.append(f"{name}: {int((~done).sum())} of {len(done)} blocks not written (incomplete)")
        for side in split.sides:
            off = split.offsets[side]
            cap = split.capacity[side]
            if off.shape != (n, 2) or np.any(off[:, 1] < off[:, 0]):
                problems.append(f"{name}/{side}: offsets malformed")
                continue
            for j in range(split.num_blocks):
                lo, hi = split.block_starts[j], split.block_starts[j + 1]
                if hi > lo and (off[lo, 0] != j * cap or off[hi - 1, 1] > (j + 1) * cap):
                    problems.append(f"{name}/{side}: block {j} rows fall outside its shard")
                if not done[j]:
                    continue
                rows = to_float32(split.read_block(j, side), store.dtype)
                bad = ~np.isfinite(rows)
                if bad.any():
                    problems.append(f"{name}/{side}: block {j} has {int(bad.sum())} non-finite values")
                elif hi > lo and not np.any(rows):
                    problems.append(f"{name}/{side}: block {j} is marked done but holds only zeros")
    return problems


def summarize_store(path: str | Path) -> dict[str, Any]:
    """What `pipeline info` shows: a dict, plus a human-readable 'text' rendering."""
    store = CacheStore(path)
    meta = store.meta
    bb, task, ext = meta["backbone"], meta["task"], meta["extraction"]
    splits: dict[str, Any] = {}
    for name in store.splits:
        split = store.split(name)
        done = split.blocks_done()
        splits[name] = {
            "examples": len(split),
            "tokens": {s: int(split.lengths[s].sum()) for s in split.sides},
            "blocks": f"{int(done.sum())}/{len(done)}",
            "complete": bool(done.all()),
        }
    disk = store.disk_bytes()
    lines = [
        f"store      {store.path}  (format {meta['format_version']}, fingerprint {store.fingerprint})",
        f"backbone   {bb['name']}  [{bb['family']}, {bb['model_type']}, d={bb['d_model']}, "
        f"revision {bb['revision']}]",
        f"task       {task['name']} ({task['kind']}; labels {', '.join(task['label_names']) or 'score'})",
        f"stored     dtype {ext['dtype']}, tokens {ext['tokens']}, max_length {ext['max_length']}, "
        f"layers {', '.join(f'{s}: {len(l)}' for s, l in ext['layers'].items())}, codec {ext['codec']}",
        f"on disk    {disk / 2**20:,.1f} MiB in {store.file_count()} files",
    ]
    for name, s in splits.items():
        tokens = ", ".join(f"{side} {n:,}" for side, n in s["tokens"].items())
        state = "complete" if s["complete"] else "INCOMPLETE"
        lines.append(f"split      {name:<22} {s['examples']:>8,} examples  tokens: {tokens}  blocks {s['blocks']}  {state}")
    return {
        "path": store.path, "fingerprint": store.fingerprint, "backbone": bb, "task": task,
        "extraction": ext, "splits": splits, "disk_bytes": disk, "text": "\n".join(lines),
    }
