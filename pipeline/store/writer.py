"""Writing a store: create or reopen it under a lock, create splits, write whole blocks, mark them done."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common.errors import StoreCorruptError, StoreMismatchError
from pipeline.store.format import ATTRS_KEY, STORED_DTYPES, BlockPlan, compressor


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
