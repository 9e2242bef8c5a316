"""Checking and summarising a store: what `pipeline verify` and `pipeline info` show."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common.errors import StoreCorruptError
from pipeline.store.format import lock_path, to_float32
from pipeline.store.reader import REEXTRACT, CacheStore, checksum_mismatch


def verify_store(path: str | Path) -> list[str]:
    """Every problem found, one line each: damaged or missing blocks, non-finite values, inconsistent metadata.

    A damaged block (its shard missing, truncated or altered: the checksum written with it no longer
    matches) is one line naming split, side and block. [] = healthy.
    """
    store = CacheStore(path)
    problems: list[str] = []
    if store.being_extracted():  # unwritten blocks are then work in progress, not damage
        problems.append(f"an extraction is writing it now (it holds {lock_path(store.path)}); verify it again once "
                        "that has finished")
    if not store.meta.consistent:
        problems.append(f"fingerprint {store.meta.recorded_fingerprint} does not match the recorded identity "
                        f"({store.fingerprint}): the metadata was edited")
    try:
        store.label_rows()
    except StoreCorruptError as exc:
        problems.append(str(exc).removeprefix(f"{store.path}: "))  # verify's lines name no store, as below
    problems += [f"{name}: not begun (its extraction stopped before it; rerun the extract command)"
                 for name in store.unbegun]
    for name in store.splits:
        mismatched: list[str] = []  # per-example arrays that read but fail their checksum
        try:
            split = store.split(name, mismatches=mismatched)
        except StoreCorruptError as exc:  # an array unreadable, or part of the layout missing
            problems.append(str(exc).removeprefix(f"{store.path}: "))
            continue
        problems += [checksum_mismatch(f"{name}/{array}") for array in mismatched]
        if any(array == "block_starts" or array.endswith("/offsets") for array in mismatched):
            continue  # the blocks cannot be located from damaged boundaries
        info = store.meta.splits[name]
        data = store.meta.identity.data.get(name)
        n = len(split)
        if info.num_examples != n or len(split.ids) != n or data is None or data.num_examples != n:
            problems.append(f"{name}: {n} labels but metadata says {info.num_examples} examples")
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
                if done[j]:
                    rows, damage = split.inspect_block(j, side)
                    found = block_findings((rows, list(damage)), store.dtype, empty=hi <= lo)
                    if found:  # damage is repaired by extracting the block again; non-finite values are the model's
                        fix = f"; {REEXTRACT}" if damage else ""
                        problems.append(f"{name}/{side} block {j}: {'; '.join(found)}{fix}")
    return problems


def block_findings(inspected: tuple[np.ndarray | None, list[str]], dtype: str, *, empty: bool) -> list[str]:
    """What is wrong with one written block: integrity first, then its values."""
    rows, found = inspected
    if rows is None:
        return found
    values = to_float32(rows, dtype)
    bad = ~np.isfinite(values)
    if bad.any():
        found.append(f"{int(bad.sum())} non-finite values")
    elif not found and not empty and not np.any(values):
        found.append("marked done but holds only zeros")
    return found


def summarize_store(path: str | Path) -> dict[str, Any]:
    """What `pipeline info` shows: a dict, plus a human-readable 'text' rendering."""
    store = CacheStore(path)
    meta = store.meta
    bb, task, settings, layout = meta.backbone, meta.task, meta.settings, meta.layout
    splits: dict[str, Any] = {}
    for name in store.splits:
        split = store.split(name)
        done = split.blocks_done()
        splits[name] = {
            "examples": len(split),
            "tokens": {s: int(split.lengths[s].sum()) for s in split.sides},
            "blocks": f"{int(done.sum())}/{len(done)}",
            "complete": bool(done.all()),
            "source": meta.identity.data[name].source,
            "computed_in": meta.splits[name].precision or "not recorded",
        }
    disk = store.disk_bytes()
    lines = [
        f"store      {store.path}  (format {meta.identity.format_version}, fingerprint {store.fingerprint})",
        f"backbone   {bb.name}  [{bb.family}, {bb.model_type}, d={bb.d_model}, revision {bb.revision}]",
        f"task       {task.name} ({task.kind}; labels {', '.join(task.label_names) or 'score'})",
        f"stored     dtype {settings.dtype}, tokens {settings.tokens}, max_length {settings.max_length}, "
        f"layers {', '.join(f'{s}: {len(kept)}' for s, kept in layout.layers.items())}, codec {settings.codec}",
        f"on disk    {disk / 2**20:,.1f} MiB in {store.file_count()} files",
    ]
    for name, s in splits.items():
        tokens = ", ".join(f"{side} {n:,}" for side, n in s["tokens"].items())
        state = "complete" if s["complete"] else "INCOMPLETE"
        lines.append(f"split      {name:<22} {s['examples']:>8,} examples  tokens: {tokens}  blocks {s['blocks']}  {state}"
                     f"  computed in {s['computed_in']}")
    for name in store.unbegun:
        splits[name] = {"complete": False, "begun": False}
        lines.append(f"split      {name:<22} INCOMPLETE: not begun (its extraction stopped before it)")
    plain = meta.to_attrs()
    return {
        "path": store.path, "fingerprint": store.fingerprint, "backbone": plain["backbone"], "task": plain["task"],
        "settings": plain["identity"]["settings"], "layout": plain["layout"], "splits": splits,
        "disk_bytes": disk, "text": "\n".join(lines),
    }
