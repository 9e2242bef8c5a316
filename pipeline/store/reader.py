"""Reading a store without the backbone: metadata, labels, offsets and whole-block reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pipeline.common.errors import (
    StoreCorruptError,
    StoreFormatError,
    StoreIncompleteError,
)
from pipeline.store.format import ATTRS_KEY, FORMAT_VERSION, SIDES


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
