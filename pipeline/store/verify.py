"""Checking and summarising a store: what `pipeline verify` and `pipeline info` show."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.store.format import fingerprint, to_float32
from pipeline.store.reader import CacheStore


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
