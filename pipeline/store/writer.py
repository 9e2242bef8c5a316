"""Writing a store: create or reopen it under a lock, create splits, write whole blocks, mark them done.

Only this module creates or deletes a store, and it deletes nothing but a READ store (a directory
whose root ``zarr.json`` carries the ``ATTRS_KEY`` attributes): never a plain folder, a file or
another Zarr group, and nothing outside the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common.errors import (
    NotAStoreError,
    StoreBusyError,
    StoreCorruptError,
    StoreFormatError,
    StoreMismatchError,
)
from pipeline.store.format import (
    ATTRS_KEY,
    CHECKSUM,
    EXAMPLE_SUMS,
    STORED_DTYPES,
    BlockPlan,
    attrs_lock_path,
    block_rows,
    checksum,
    checksum_columns,
    checksum_hex,
    compressor,
    example_arrays,
    is_remote,
    lock_path,
    readers_lock_path,
    round_up,
)
from pipeline.store.meta import SplitData, StoreMeta
from pipeline.store.reader import CachedSplit, first_line

try:
    import fcntl
except ImportError:  # Windows: no flock, so extractions take no lock (see extraction_hold)
    fcntl = None

log = logging.getLogger(__name__)
BUSY_WAIT_S = 1.0  # how long an extraction waits for the store's lock: a reader's check holds it for milliseconds


class StoreWriter:
    """Creates or reopens a store, checks it is the same store (identity), and writes whole blocks."""

    def __init__(self, path: str | Path, meta: StoreMeta, *, overwrite: bool = False, precision: str = "") -> None:
        """``precision``: the arithmetic this run's blocks are computed in (``Backbone.precision``)."""
        self.path = str(path)
        self.meta = meta  # this run's record: its identity's data names the splits it will write
        self.precision = precision
        self.lock = store_lock(self.path)
        self._rows: dict[str, tuple[np.ndarray, dict[str, np.ndarray], list[str]]] = {}
        with self.lock:
            self.group = self._open_or_create(overwrite)

    def _open_or_create(self, overwrite: bool) -> Any:
        import zarr

        if overwrite:
            remove_store(self.path)
        check_target(self.path, overwrite=False)
        try:
            group = zarr.open_group(self.path, mode="r+")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            group = None
        except Exception as exc:
            raise StoreCorruptError(f"{self.path} exists but is not a readable Zarr group ({first_line(exc)}); "
                                    "remove it or pass --overwrite") from None
        asking = set(self.meta.identity.data)  # the splits this run will write
        if group is None:
            empty = dataclasses.replace(self.meta.identity, data={})
            attrs = dataclasses.replace(self.meta, identity=empty, splits={}, asked=tuple(sorted(asking))).to_attrs()
            # Attributes in the same write as the group: a store is never left without them.
            return zarr.open_group(self.path, mode="w", attributes={ATTRS_KEY: attrs})
        try:
            old = StoreMeta.from_attrs(group.attrs.get(ATTRS_KEY), self.path)
        except StoreFormatError as exc:  # an older format: the same remedy as other settings
            raise StoreMismatchError(str(exc)) from None
        problem = self.meta.identity.mismatch(old.identity)
        if problem:
            what = f"{self.path} was made from other inputs ({problem})"
            raise StoreMismatchError(f"{what}; pass --overwrite to replace it or choose another --out", what)
        if not asking <= set(old.asked):  # more splits asked for: recorded before any is begun
            group.attrs[ATTRS_KEY] = dataclasses.replace(old, asked=tuple(sorted(asking | set(old.asked)))).to_attrs()
        return group

    # ---- splits -------------------------------------------------------------------------------
    def _stored_meta(self) -> StoreMeta:
        return StoreMeta.from_attrs(self.group.attrs[ATTRS_KEY], self.path)

    def split_ready(self, split: str) -> bool:
        """True if the split's arrays were fully created before (a crash during creation redoes it)."""
        return split in self._stored_meta().splits

    def ensure_split(self, split: str, *, labels: np.ndarray, ids: np.ndarray, plan: BlockPlan,
                     lengths: dict[str, np.ndarray], data: SplitData) -> None:
        """Create the split's arrays unless an earlier run (or another --part) already did.

        The check reads the attributes as they are on disk *under the lock*: a group opened
        earlier caches them, and a part acting on that stale view would delete and recreate a
        split another part is already writing into.
        """
        examples = example_arrays(labels, ids, plan, {side: lengths[side] for side in self.meta.layout.layers})
        with self.lock:
            self.group = zarr_reopen(self.path)
            if not self.split_ready(split):
                self._create_split(split, examples, plan=plan, data=data)
            else:
                self._repair_examples(split, examples)
        g = self.group[split]
        sides = [side for side in self.meta.layout.sides if side in g]
        offsets = {s: np.asarray(g[s]["offsets"][:]) for s in sides}
        self._rows[split] = (np.asarray(g["block_starts"][:]), offsets, list(g["checksums"].attrs["columns"]))

    def ensure_array(self, name: str, data: np.ndarray) -> None:
        """A small root array (e.g. label_rows) with its checksum, written by whichever part comes first, and
        written again when a rerun finds it damaged (not merely different: parts on other devices may round
        differently)."""
        with self.lock:
            self.group = zarr_reopen(self.path)
            if name not in self.group or _damaged(self.group[name]):
                self.group.create_array(name, data=data, attributes={CHECKSUM: checksum_hex(data)}, overwrite=True)

    def _repair_examples(self, split: str, examples: dict[str, np.ndarray]) -> None:
        """Write again the per-example arrays of a created split that no longer hold what this run computed (a
        chunk lost reads back as zeros): the run's identity matched the store's, so its arrays are the store's."""
        g = self.group[split]
        try:
            for name, values in examples.items():
                if not _holds(g, name, values):
                    parent, _, leaf = name.rpartition("/")
                    (g[parent] if parent else g).create_array(leaf, data=values, overwrite=True)
                    log.warning("%s: %s/%s was damaged; written again", self.path, split, name)
            sums = {name: checksum_hex(values) for name, values in examples.items()}
            if g.attrs.get(EXAMPLE_SUMS) != sums:  # also a store written before the checksums were kept
                g.attrs[EXAMPLE_SUMS] = sums
        except Exception as exc:
            raise StoreCorruptError(f"{self.path}: split {split!r} cannot be repaired in place ({first_line(exc)}); "
                                    "rerun `pipeline extract` with --overwrite to rebuild the store") from None

    def _create_split(self, split: str, examples: dict[str, np.ndarray], *, plan: BlockPlan, data: SplitData) -> None:
        layout, settings = self.meta.layout, self.meta.settings
        d_model = self.meta.backbone.d_model
        if split in self.group:
            del self.group[split]
        g = self.group.create_group(split, attributes={
            EXAMPLE_SUMS: {name: checksum_hex(values) for name, values in examples.items()}})
        for name in ("labels", "ids", "block_starts"):
            g.create_array(name, data=examples[name])
        columns = checksum_columns(layout.per_token)
        g.create_array("checksums", shape=(plan.num_blocks, len(columns)), chunks=(1, len(columns)), dtype="uint64",
                       fill_value=0, attributes={"columns": columns, "algorithm": CHECKSUM})
        g.create_array("blocks_done", shape=(plan.num_blocks,), chunks=(1,), dtype="uint8", fill_value=0)
        for side, layers in layout.layers.items():
            states, cap, rows = len(layers), plan.capacity[side], plan.chunk_rows[side]
            total = plan.num_blocks * cap
            s = g.create_group(side)
            s.create_array(
                "hidden", shape=(total, states, d_model), chunks=(rows, states, d_model),
                shards=(cap, states, d_model), dtype=STORED_DTYPES[settings.dtype], fill_value=0,
                compressors=compressor(settings.codec), dimension_names=("row", "layer", "dim"),
            )
            s.create_array("offsets", data=examples[f"{side}/offsets"])
            s.create_array("lengths", data=examples[f"{side}/lengths"])
            if layout.per_token[side]:
                s.create_array("token_ids", shape=(total,), chunks=(rows,), shards=(cap,), dtype="int32",
                               fill_value=-1, compressors=compressor("zstd"))
        sides = list(layout.layers)
        self._update_split(split, data, num_examples=int(len(examples["labels"])), num_blocks=plan.num_blocks,
                           num_tokens={side: int(examples[f"{side}/lengths"].sum()) for side in sides},
                           num_rows={side: int((plan.offsets[side][:, 1] - plan.offsets[side][:, 0]).sum())
                                     for side in sides},
                           complete=False, precision=self.precision)

    def check_precision(self, split: str) -> None:
        """Refuse to add blocks computed in other arithmetic than the split's blocks so far (a resume or another
        --part on another device): the split would mix both. A store from before it was recorded is not checked."""
        recorded = self._stored_meta().splits[split].precision
        if recorded and recorded != self.precision:
            what = (f"{self.path}: split {split!r} was begun computing in {recorded}, and this run computes in "
                    f"{self.precision} (another --device or --dtype)")
            raise StoreMismatchError(f"{what}; finish it where it was begun, or pass --overwrite to extract it again "
                                     "in one way", what)

    def _update_split(self, split: str, data: SplitData | None = None, **info: Any) -> None:
        """Read-modify-write of the root attributes, one process at a time; unchanged ones are not rewritten."""
        with self.lock:
            self.group = zarr_reopen(self.path)
            current = self.group.attrs[ATTRS_KEY]
            new = StoreMeta.from_attrs(current, self.path).with_split(split, data, **info).to_attrs()
            if json.loads(json.dumps(new)) != current:
                self.group.attrs[ATTRS_KEY] = new

    # ---- blocks -------------------------------------------------------------------------------
    def done_blocks(self, split: str) -> np.ndarray:
        return np.asarray(self.group[split]["blocks_done"][:], dtype=bool)

    def recheck(self, split: str, blocks: Iterable[int]) -> dict[int, str]:
        """Done blocks among ``blocks`` whose shards no longer match their checksums; their flags are cleared.

        Run at the start of a resume, so a rerun re-extracts exactly the damaged blocks.
        """
        reader = CachedSplit(self.group[split], split, self.meta.settings.dtype, self.path)
        damaged = reader.damaged_blocks(blocks)
        if damaged:
            with self.lock:  # not while another part decides the split is complete
                for block in damaged:
                    self.group[split]["blocks_done"][block] = 0
                self._update_split(split, complete=False)
        return damaged

    def write_block(self, split: str, block: int, hidden: dict[str, np.ndarray], token_ids: dict[str, np.ndarray]) -> None:
        """Write one block's full shards and their checksums, then (only then) mark it done."""
        g = self.group[split]
        starts, offsets, columns = self._rows[split]
        sums = np.zeros(len(columns), dtype=np.uint64)
        writes: list[tuple[Any, slice, np.ndarray]] = []
        for side, data in hidden.items():
            cap = data.shape[0]
            start, end = block_rows(starts, offsets[side], block)
            used = end - start
            arrays = {"hidden": data, **({"token_ids": token_ids[side]} if f"{side}/token_ids" in columns else {})}
            for name, values in arrays.items():
                array = g[side][name]
                clear_shard(array, block)
                # The used rows' chunks only: those past them hold nothing but the fill value, stored by omission.
                stop = min(cap, round_up(used, array.chunks[0]))
                writes.append((array, slice(block * cap, block * cap + stop), values[:stop]))
                sums[columns.index(f"{side}/{name}")] = checksum(values[:used])
        write_shards(writes)
        for name in ("checksums", "blocks_done"):
            remove_orphans_of(g[name], block)
        g["checksums"][block] = sums
        g["blocks_done"][block] = 1

    def mark_complete(self, split: str) -> bool:
        """Record completion if every block is written (by this or any other part)."""
        with self.lock:
            if self.done_blocks(split).all():
                self._update_split(split, complete=True)
                return True
            return False


def _holds(group: Any, name: str, values: np.ndarray) -> bool:
    """Whether ``group[name]`` reads back as ``values`` (same dtype and elements); False if it cannot be read."""
    try:
        stored = np.asarray(group[name][:])
    except Exception:
        return False
    return stored.dtype == values.dtype and stored.shape == values.shape and np.array_equal(stored, values,
                                                                                              equal_nan=True)


def _damaged(array: Any) -> bool:
    """Whether a small array no longer matches the checksum written with it, or cannot be read (one written
    before the checksums were kept: only if it cannot be read)."""
    try:
        values = np.asarray(array[:])
    except Exception:
        return True
    expected = array.attrs.get(CHECKSUM)
    return expected is not None and checksum_hex(values) != expected


def write_shards(writes: Sequence[tuple[Any, slice, np.ndarray]]) -> None:
    """Write shards, each ``array[rows] = values``, on an event loop of the calling thread's own.

    zarr's synchronous API runs the Python part of every write (copying rows into chunks, joining a shard's
    chunks) on one event-loop thread shared by the whole process, so a pool of writer threads goes at that
    one thread's pace (on the 16-core H200 host, 8 writers stored 240 MiB/s against a disk that takes 1,359;
    ``benchmarks/write.py`` on 2 cores: uncompressed shards 289 -> 755 MiB/s with one writer, 399 -> 1,273 with two).
    Here each writer runs its own loop, with one thread for the codecs it hands off (compression runs in
    parallel across writers, not in dozens of threads competing with the backbone's for the cores).
    ``write_empty_chunks``: every chunk given is written, so zarr no longer compares each one with the fill
    value (a full pass over the data, on that shared thread); ``write_block`` leaves out the chunks past a
    block's used rows instead. Inside a running event loop (a notebook calling this directly) zarr's own
    synchronous path is used.
    """
    arrays = [(array.with_config({"write_empty_chunks": True}), rows, values) for array, rows, values in writes]
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        for array, rows, values in arrays:
            array[rows] = values
        return

    async def write() -> None:  # the codec work zarr hands off (``to_thread``) runs on one thread of this loop's
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1, thread_name_prefix="zarr-codec"))
        await asyncio.gather(*(array.async_array.setitem(rows, values) for array, rows, values in arrays))

    asyncio.run(write())


def clear_shard(array: Any, block: int) -> None:
    """Delete block's shard of an array before it is written again.

    zarr reads an existing shard to update it, even when the write covers it whole; a damaged one
    (truncated, or left half-written by a killed run) would fail that read.
    """
    from zarr.core.sync import sync

    sync((array.store_path / block_key(array, block)).delete())
    remove_orphans_of(array, block)


def block_key(array: Any, block: int) -> str:
    """The key of block's chunk (or shard) of an array chunked by block along its first axis."""
    return array.metadata.encode_chunk_key((block,) + (0,) * (array.ndim - 1))


def remove_orphans_of(array: Any, block: int) -> None:
    """Delete what a killed write of block's chunk left (``<chunk>.<uuid>.partial``), in a local store.

    Every per-block file of a split is chunked by block, and a block has one writer (its --part, or
    the one whole extraction), so these files are that writer's own orphans: a resumed ``--part``
    leaves none behind, as a resumed whole extraction does (``remove_orphaned_writes``).
    """
    root = getattr(array.store_path.store, "root", None)
    if root is None:  # remote stores write objects whole: nothing to leave behind
        return
    chunk = Path(root) / array.store_path.path / block_key(array, block)
    if chunk.parent.is_dir():
        for orphan in chunk.parent.glob(f"{chunk.name}.*.partial"):
            if _ORPHAN.search(orphan.name):
                orphan.unlink(missing_ok=True)


def zarr_reopen(path: str) -> Any:
    """The group as it is on disk now (another --part may have changed its attributes)."""
    import zarr

    return zarr.open_group(path, mode="r+")


# ---- what is at a path, and what may be deleted ---------------------------------------------------


def path_kind(path: str) -> str:
    """'absent', 'empty' (an empty folder), 'store' (a READ store), 'remote', or a phrase for anything else."""
    if is_remote(path):
        return "remote"
    local = Path(path)
    if local.is_symlink():
        return "a symbolic link"
    if not local.exists():
        return "absent"
    if not local.is_dir():
        return "a file"
    if not any(local.iterdir()):
        return "empty"
    try:
        root = json.loads((local / "zarr.json").read_text())
    except (OSError, ValueError):
        return "a folder that is not a Zarr store"
    attrs = root.get("attributes") if isinstance(root, dict) else None
    if root.get("node_type") == "group" and isinstance(attrs, dict) and ATTRS_KEY in attrs:
        return "store"
    return "a Zarr store that is not a READ store"


def check_target(path: str, *, overwrite: bool) -> None:
    """Refuse (one line) a path that holds something other than a READ store: not ours to fill or delete."""
    kind = path_kind(path)
    if kind in ("absent", "empty", "store", "remote"):
        return
    # One clause saying it is not a READ store: a foreign Zarr store's kind says so already.
    what = f"{kind} (no '{ATTRS_KEY}' attributes)" if kind.endswith("not a READ store") else (
        f"{kind}, not a READ store (no '{ATTRS_KEY}' attributes)")
    if overwrite:
        raise NotAStoreError(f"refusing to delete {path} for --overwrite: it is {what}; remove it yourself or "
                             "choose another --out")
    raise NotAStoreError(f"{path} is {what}; choose another --out (the pipeline neither fills nor deletes it)")


def remove_store(path: str) -> None:
    """Delete a READ store for --overwrite; refuse anything else, and a store a training run is reading (it holds
    ``<store>.readers.lock``): pulled from under the run, a held split once gave predictions of the new store's
    examples with the old run's scores. Nothing outside the store is touched."""
    check_target(path, overwrite=True)
    if path_kind(path) != "store":
        return
    readers = _readers_hold(path, exclusive=True)
    if readers is False:
        raise StoreBusyError(f"a training run is reading {path} now (it holds {readers_lock_path(path)}); let it "
                             "finish, or stop it, then rerun the extraction")
    try:
        shutil.rmtree(path)
    finally:
        if type(readers) is int:  # a descriptor (not None, not False: bool is an int too)
            readers_lock_path(path).unlink(missing_ok=True)  # nothing beside nothing; a later reader makes its own
            os.close(readers)


def enclosing_store(path: str | Path) -> Path | None:
    """The READ store that ``path`` is or lies in (None: none). Other outputs must stay out of stores: a store
    is deleted whole by `pipeline extract --overwrite` (and `dvc repro`), with whatever was written into it."""
    local = Path(path).absolute()
    for folder in (local, *local.parents):
        try:
            if (folder / "zarr.json").is_file() and path_kind(str(folder)) == "store":
                return folder
        except OSError:  # an ancestor this user may not list: not a store of theirs
            continue
    return None


# ---- locks --------------------------------------------------------------------------------------


def store_lock(path: str) -> Any:
    """The lock a writer holds while it creates the store or a split or rewrites the root attributes
    (``<store>.attrs.lock``): one lock object per store in a process. Remote (fsspec) stores get no lock:
    start part 0 first there, and let it create the splits."""
    lock_file = attrs_lock_path(path)
    if lock_file is None:
        return contextlib.nullcontext()
    from filelock import FileLock

    lock_file.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_file), is_singleton=True)


@contextlib.contextmanager
def extraction_hold(path: str, *, whole: bool) -> Iterator[None]:
    """Hold the store's extraction lock (``<store>.lock``) while extracting: a whole extraction alone (it clears
    the writes a killed process left, and writes every block), ``--part`` processes shared with each other.

    So a whole extraction refuses while another one or any part runs, and a part while a whole one runs; the
    kernel releases the lock when its process ends, ``kill -9`` included. Remote stores and systems without
    ``flock`` (Windows) get no lock.
    """
    lock_file = lock_path(path)
    if lock_file is None or fcntl is None:
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = _held_lock(lock_file, exclusive=whole, wait_s=BUSY_WAIT_S)
    if fd is None:
        raise StoreBusyError(_busy_reason(path, lock_file, whole=whole))
    try:
        if whole:
            remove_orphaned_writes(path)
        yield
    finally:
        # Refused before the store was made (bad settings): leave no lock file beside nothing. Only a sole holder
        # removes it, and whoever waited on the removed file takes the new one (``_held_lock``).
        if path_kind(path) == "absent" and _flock(fd, exclusive=True, wait_s=0):
            lock_file.unlink(missing_ok=True)
        os.close(fd)  # releases the lock


def _readers_hold(path: str, *, exclusive: bool) -> int | bool | None:
    """``flock`` on the store's readers lock without waiting: its descriptor, False when others hold it, or None
    where there is no lock to take (a remote store, no ``flock``, a read-only folder beside the store)."""
    lock_file = readers_lock_path(path)
    if lock_file is None or fcntl is None:
        return None
    try:
        fd = _held_lock(lock_file, exclusive=exclusive, wait_s=0)
    except OSError:  # a store on a read-only mount: nobody can replace it from here either
        return None
    return False if fd is None else fd


@contextlib.contextmanager
def reading_hold(path: str) -> Iterator[None]:
    """Hold the store's readers lock shared while a training run reads it: an extraction that would replace the
    store (``remove_store``) refuses meanwhile, and this refuses while one removes it. No store at ``path``: no
    lock (and no lock file beside nothing); opening it fails with its own message."""
    fd = _readers_hold(path, exclusive=False) if path_kind(path) == "store" else None
    if fd is False:
        raise StoreBusyError(f"an extraction is replacing {path} now (it holds {readers_lock_path(path)}); let it "
                             "finish, then rerun")
    try:
        yield
    finally:
        if type(fd) is int:  # a descriptor (not None, not False)
            os.close(fd)


def _held_lock(lock_file: Path, *, exclusive: bool, wait_s: float) -> int | None:
    """A descriptor of ``lock_file`` holding ``flock`` (None: not taken within ``wait_s``). A lock taken on a file
    that was removed meanwhile guards nothing, so it is dropped and the file now at the path locked instead."""
    deadline = time.monotonic() + wait_s
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        if not _flock(fd, exclusive=exclusive, wait_s=max(0.0, deadline - time.monotonic())):
            os.close(fd)
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(lock_file).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _flock(fd: int, *, exclusive: bool, wait_s: float) -> bool:
    """Take ``flock`` on ``fd``, shared or exclusive, trying for up to ``wait_s`` seconds; whether it was taken."""
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, mode)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _busy_reason(path: str, lock_file: Path, *, whole: bool) -> str:
    """Why an extraction may not start now, and what to do: who holds the lock (shared: --part processes)."""
    if not whole:
        return (f"a whole extraction is filling {path} now (it holds {lock_file}); let it finish (it writes every "
                "block), or stop it and run the --part processes")
    try:
        probe = os.open(lock_file, os.O_RDWR)
    except FileNotFoundError:  # its holder was refused and removed it meanwhile: busy a moment ago
        return f"another extraction was starting on {path}; rerun"
    try:
        by_parts = _flock(probe, exclusive=False, wait_s=0)
    finally:
        os.close(probe)
    if by_parts:
        return (f"--part processes are filling {path} now (they hold {lock_file}); let them finish, or join them "
                "with another --part I/N")
    return (f"another extraction is filling {path} now (it holds {lock_file}); let it finish and rerun, or split "
            "the work between processes with --part I/N")


# zarr's local store writes every file as ``<name>.<uuid4 hex>.partial`` and then renames it.
_ORPHAN = re.compile(r"\.[0-9a-f]{32}\.partial$")


def remove_orphaned_writes(path: str) -> int:
    """Delete the temporary files a killed process left mid-write (``kill -9``: no cleanup ran).

    Called only under the whole-extraction lock, when nobody else writes the store, so every such
    file is an orphan; without this a resumed store would equal an uninterrupted one except for
    them. Returns how many were removed.
    """
    root = Path(path)
    if is_remote(path) or not root.is_dir():
        return 0
    orphans = [p for p in root.rglob("*.partial") if _ORPHAN.search(p.name) and p.is_file()]
    for orphan in orphans:
        orphan.unlink()
    return len(orphans)
