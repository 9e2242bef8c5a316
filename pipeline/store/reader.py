"""Reading a store without the backbone: metadata, labels, offsets and whole-block reads, checked."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from zarr.core.buffer import default_buffer_prototype

from pipeline.common.errors import (
    ConfigError,
    NotAStoreError,
    StoreCorruptError,
    StoreIncompleteError,
    StoreNotFoundError,
)
from pipeline.store.format import (
    ATTRS_KEY,
    CHECKSUM,
    EXAMPLE_SUMS,
    SIDES,
    block_rows,
    checksum,
    checksum_hex,
    is_remote,
    lock_path,
)
from pipeline.store.meta import StoreMeta
from pipeline.store.shards import ShardFile

REEXTRACT = "rerun the same `pipeline extract` command to re-extract it"
REBUILD = "rerun `pipeline extract` with --overwrite to rebuild the store"


def checksum_mismatch(array: str) -> str:
    """The line for a small array (``train/labels``, ``label_rows``) whose values no longer match their checksum."""
    return f"{array} does not match its checksum (a chunk of it is missing or altered); {REEXTRACT}"


def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception as one short line (zarr's errors on a damaged shard span many)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


class CachedSplit:
    """One split of a store: labels, offsets and block reads checked against the block's checksums."""

    def __init__(self, group: Any, name: str, dtype: str, path: str = "", *,
                 mismatches: list[str] | None = None) -> None:
        """Reads the split's per-example arrays, each checked against its checksum: a damaged one raises one line
        (a rerun of the extraction writes it again), as does a missing array (the store must be rebuilt).

        ``mismatches``, when given, collects the names of arrays that read but fail their checksum instead, so
        that a check of the whole store (``pipeline verify``) goes on to the blocks.
        """
        self.group = group
        self.name = name
        self.dtype = dtype
        self.path = path
        self._mismatches = mismatches
        self._sums: dict[str, str] = dict(group.attrs.get(EXAMPLE_SUMS, {}))  # none in stores written before them
        self.labels = self._example_array("labels")
        self.ids = self._example_array("ids")
        self.block_starts = self._example_array("block_starts")
        self.sides = [s for s in SIDES if s in group]
        self.offsets = {s: self._example_array(f"{s}/offsets") for s in self.sides}
        self.lengths = {s: self._example_array(f"{s}/lengths") for s in self.sides}
        try:
            self.capacity = {s: int(group[s]["hidden"].shards[0]) for s in self.sides}
            self._checksums = group["checksums"]
            self.columns: list[str] = list(self._checksums.attrs["columns"])
            group["blocks_done"]  # there too, or it is missing
        except Exception as exc:
            raise StoreCorruptError(f"{path}: split {name!r} lacks part of its layout ({first_line(exc)}); "
                                    f"{REBUILD}") from None
        self._shard_files: dict[tuple[str, str], ShardFile | None] = {}

    def _example_array(self, name: str) -> np.ndarray:
        """One per-example array, whole, checked against the checksum written with the split."""
        try:
            values = np.asarray(self.group[name][:])
        except Exception as exc:
            raise StoreCorruptError(f"{self.path}: {self.name}/{name} is unreadable ({first_line(exc)}); "
                                    f"{REEXTRACT}") from None
        if name in self._sums and checksum_hex(values) != self._sums[name]:
            if self._mismatches is not None:
                self._mismatches.append(name)
                return values
            raise StoreCorruptError(f"{self.path}: {checksum_mismatch(f'{self.name}/{name}')}")
        return values

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_blocks(self) -> int:
        return len(self.block_starts) - 1

    def blocks_done(self) -> np.ndarray:
        return np.asarray(self.group["blocks_done"][:], dtype=bool)

    def hidden(self, side: str) -> Any:
        return self.group[side]["hidden"]

    def block_rows(self, block: int, side: str) -> tuple[int, int]:
        return block_rows(self.block_starts, self.offsets[side], block)

    def _shard_file(self, side: str, array: str) -> ShardFile | None:
        """The direct reader of one of the side's arrays (None: zarr reads it), opened once."""
        key = (side, array)
        if key not in self._shard_files:
            self._shard_files[key] = ShardFile.of(self.group[side][array])
        return self._shard_files[key]

    def _read(self, block: int, side: str, array: str, verify: bool,
              out: np.ndarray | None = None) -> tuple[np.ndarray | None, str | None]:
        """A block's used rows of one array, and what is wrong with them (None: intact); decoded into ``out``
        when given."""
        start, end = self.block_rows(block, side)
        try:
            shard = self._shard_file(side, array)
            if shard is not None:  # straight from the shard file, on this thread
                target = out if out is not None else np.empty((end - start, *shard.row_shape), shard.dtype)
                rows = shard.read(block, start, end, target)
            elif out is None:
                rows = np.asarray(self.group[side][array][start:end])
            else:
                self.group[side][array].get_basic_selection(
                    slice(start, end), out=default_buffer_prototype().nd_buffer.from_numpy_array(out))
                rows = out
        except Exception as exc:  # a truncated or garbled shard: zarr/codec errors of every kind
            return None, f"{array} shard unreadable ({first_line(exc)})"
        if verify:
            expected = int(self._checksums[block, self.columns.index(f"{side}/{array}")])
            if checksum(rows) != expected:
                return rows, f"{array} checksum mismatch (its shard is missing, truncated or altered)"
        return rows, None

    def read_block(self, block: int, side: str, *, verify: bool = True, out: np.ndarray | None = None) -> np.ndarray:
        """The stored rows of one block (used rows only), in the stored dtype: one shard read.

        Checked against the checksum written with the block; a damaged shard raises one line. ``out``: an array
        of exactly those rows' shape and dtype (a slice of a larger one, say) that the shard is decoded into,
        with no copy of its own.
        """
        rows, problem = self._read(block, side, "hidden", verify, out)
        if problem is not None:
            raise StoreCorruptError(f"{self.path}: {self.name}/{side} block {block}: {problem}; {REEXTRACT}")
        return rows

    def inspect_block(self, block: int, side: str) -> tuple[np.ndarray | None, list[str]]:
        """A block's hidden rows (None if unreadable) and every integrity problem of the side's shards."""
        rows, problem = self._read(block, side, "hidden", True)
        problems = [problem] if problem else []
        if f"{side}/token_ids" in self.columns:
            _, problem = self._read(block, side, "token_ids", True)
            problems += [problem] if problem else []
        return rows, problems

    def damaged_blocks(self, blocks: Iterable[int]) -> dict[int, str]:
        """Blocks among ``blocks`` whose shards do not match their checksums: block -> 'split/side block j: why'."""
        damaged: dict[int, str] = {}
        for block in blocks:
            for side in self.sides:
                _, problems = self.inspect_block(block, side)
                if problems:
                    damaged[block] = f"{self.name}/{side} block {block}: {'; '.join(problems)}"
                    break
        return damaged

    def nbytes(self, side: str) -> int:
        """Bytes of this side's used rows once in memory, in the stored dtype."""
        arr = self.hidden(side)
        rows = int((self.offsets[side][:, 1] - self.offsets[side][:, 0]).sum())
        return rows * int(np.prod(arr.shape[1:])) * arr.dtype.itemsize


def _check_local_store(name: str) -> None:
    """Refuse, naming the fix, a local path that cannot be a store: nothing there, a file, or a folder without
    Zarr metadata (rerunning `pipeline extract` would not help: it refuses to fill a folder of other files)."""
    path, where = Path(name), "a folder written by `pipeline extract`"
    if not path.exists():
        raise StoreNotFoundError(f"no store at {name}; run `pipeline extract` first")
    if not path.is_dir():
        raise NotAStoreError(f"{name} is a file, not a store ({where}); pass the store's folder")
    if not (path / "zarr.json").exists():
        if not any(path.iterdir()):
            raise StoreNotFoundError(f"no store at {name} (an empty folder); run `pipeline extract` first")
        raise NotAStoreError(f"{name} is a folder but not a store (no zarr.json; a store is {where}); "
                             "pass the store's folder")


class CacheStore:
    """A finished (or in-progress) store opened read-only."""

    def __init__(self, path: str | Path) -> None:
        import zarr

        self.path = str(path)
        if not self.path.strip():  # Path("") is the current folder: never read it as a store by accident
            raise ConfigError("no store given (an empty path); pass the folder `pipeline extract --out` wrote")
        if not is_remote(self.path):
            _check_local_store(self.path)
        try:
            self.group = zarr.open_group(self.path, mode="r")
        except Exception as exc:
            raise StoreCorruptError(f"{self.path} is not a readable Zarr group ({first_line(exc)}); remove it and rerun "
                                    "`pipeline extract` (it neither fills nor deletes a folder it cannot read)") from None
        self.meta = StoreMeta.from_attrs(self.group.attrs.get(ATTRS_KEY), self.path)

    @property
    def fingerprint(self) -> str:
        return self.meta.fingerprint

    @property
    def dtype(self) -> str:
        return self.meta.settings.dtype

    @property
    def splits(self) -> list[str]:
        return [s for s in self.meta.splits if s in self.group]

    @property
    def unbegun(self) -> list[str]:
        """Splits an extraction was asked for and stopped before beginning: the store is unfinished."""
        return [s for s in self.meta.asked if s not in self.splits]

    def split(self, name: str, *, mismatches: list[str] | None = None) -> CachedSplit:
        """One split, its per-example arrays checked (``mismatches``: see ``CachedSplit``)."""
        if name in self.unbegun:
            raise StoreIncompleteError(f"{self.path}: split {name!r} was asked for, but its extraction stopped "
                                       "before it began; rerun that `pipeline extract` command to finish it")
        if name not in self.splits:
            raise StoreIncompleteError(
                f"{self.path} has no split {name!r} (it has {', '.join(self.splits) or 'none'}); if its extraction "
                f"was stopped, rerun that `pipeline extract` command to finish it, else add the split with "
                f"`pipeline extract ... --splits {name}`"  # a store from before ``asked`` was recorded
            )
        split = CachedSplit(self.group[name], name, self.dtype, self.path, mismatches=mismatches)
        if split.sides != [side for side in SIDES if side in self.meta.layout.layers]:
            raise StoreCorruptError(f"{self.path}: split {name!r} has sides {split.sides}, its metadata "
                                    f"{list(self.meta.layout.layers)}; {REBUILD}")
        return split

    def label_rows(self) -> np.ndarray | None:
        """The head's label rows (seq2seq), checked against their checksum; None when the store has none."""
        if "label_rows" not in self.group:
            return None
        try:
            array = self.group["label_rows"]
            rows = np.asarray(array[:])
        except Exception as exc:
            raise StoreCorruptError(f"{self.path}: label_rows is unreadable ({first_line(exc)}); {REEXTRACT}") from None
        expected = array.attrs.get(CHECKSUM)  # none in stores written before it was kept
        if expected is not None and checksum_hex(rows) != expected:
            raise StoreCorruptError(f"{self.path}: {checksum_mismatch('label_rows')}")
        return rows

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
                fix = ("an extraction is writing it now (it holds the store's .lock); wait for it to finish"
                       if self.being_extracted() else "rerun the same `pipeline extract` command to finish it")
                raise StoreIncompleteError(
                    f"{self.path}: split {name!r} is incomplete ({int(done.sum())}/{len(done)} blocks written); {fix}"
                )

    def being_extracted(self) -> bool:
        """Whether an extraction (a whole one or a --part process) holds the store's lock (``<store>.lock``) now."""
        lock_file = lock_path(self.path)
        if lock_file is None or not lock_file.is_file():
            return False
        from filelock import FileLock, Timeout

        try:
            with FileLock(str(lock_file)).acquire(timeout=0):
                return False
        except Timeout:
            return True
        except OSError:  # a lock file this process may not open: nobody can be told apart
            return False

    def disk_bytes(self) -> int:
        if is_remote(self.path):
            return -1
        return sum(f.stat().st_size for f in Path(self.path).rglob("*") if f.is_file())

    def file_count(self) -> int:
        if is_remote(self.path):
            return -1
        return sum(1 for f in Path(self.path).rglob("*") if f.is_file())
