"""A synthetic store written through ``StoreWriter``: random states, no model, no GLUE files.

Tests of the store (and of training) get a real store in milliseconds, knowing every value in it.
The layout comes from the store's own arithmetic (``block_layout``, ``plan_blocks``); only the
states are made up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from pipeline.common.tasks import get_task
from pipeline.store import (
    FORMAT_VERSION,
    STORED_DTYPES,
    BackboneInfo,
    BlockPlan,
    ExtractionSettings,
    SplitData,
    StoreIdentity,
    StoreLayout,
    StoreMeta,
    StoreWriter,
    TaskInfo,
    block_layout,
    examples_hash,
    logical_view,
    plan_blocks,
)
from pipeline.store.format import EXAMPLE_SUMS, checksum_hex

FAMILY_SIDES = {"seq2seq": ("encoder", "decoder"), "encoder": ("encoder",), "decoder": ("decoder",)}


@dataclass
class SyntheticSplit:
    texts: list[dict[str, str]]
    labels: np.ndarray
    ids: np.ndarray
    tokens: np.ndarray  # (n,) token count of each example
    states: dict[str, list[np.ndarray]]  # side -> per example (rows, layers, d) float32, as stored (exact)
    token_ids: list[np.ndarray]  # per example, the encoder's token ids
    plan: BlockPlan | None = None


@dataclass
class SyntheticStore:
    path: str
    meta: StoreMeta
    splits: dict[str, SyntheticSplit] = field(default_factory=dict)
    label_rows: np.ndarray | None = None

    def block_buffers(self, split: str, block: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One block's full shards (stored dtype) and token ids, as an extraction would hand them to the writer."""
        data, layout, dtype = self.splits[split], self.meta.layout, self.meta.settings.dtype
        plan = data.plan
        d = self.meta.backbone.d_model
        hidden, token_ids = {}, {}
        for side, layers in layout.layers.items():
            cap = plan.capacity[side]
            buffer = np.zeros((cap, len(layers), d), dtype=STORED_DTYPES[dtype])
            view = logical_view(buffer, dtype)
            ids = np.full(cap, -1, dtype=np.int32)
            for i in range(plan.block_starts[block], plan.block_starts[block + 1]):
                start, end = plan.offsets[side][i] - block * cap
                view[start:end] = data.states[side][i]
                if layout.per_token[side]:
                    ids[start:end] = data.token_ids[i]
            hidden[side] = buffer
            if layout.per_token[side]:
                token_ids[side] = ids
        return hidden, token_ids

    def writer(self) -> StoreWriter:
        """The store reopened for writing, every split ready for ``write_block`` (as a resumed extraction)."""
        writer = StoreWriter(self.path, self.meta)
        for name in self.splits:
            ensure_split(writer, name, self.splits[name])
        return writer


def ensure_split(writer: StoreWriter, name: str, split: SyntheticSplit) -> None:
    layout = writer.meta.layout
    lengths = {side: split.tokens if side == "encoder" else np.ones_like(split.tokens) for side in layout.sides}
    writer.ensure_split(name, labels=split.labels, ids=split.ids, plan=split.plan, lengths=lengths,
                        data=writer.meta.identity.data[name])


def damage_shard(shard: Path, how: str) -> None:
    """Damage one shard file as a disk, a copy or a person might: delete it, truncate it, or flip a byte."""
    if how == "delete":
        shard.unlink()
        return
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "flip":
        data[len(data) // 3] ^= 0xFF  # inside the compressed chunks (the shard index is at the end)
    else:
        raise ValueError(f"unknown damage {how!r}")
    shard.write_bytes(bytes(data))


def set_example_array(store: str | Path, split: str, name: str, values: np.ndarray) -> None:
    """Give a split's per-example array (e.g. ``labels``) new values and their checksum, as if extracted so."""
    group = zarr.open_group(Path(store, split), mode="r+")
    group[name][:] = values
    group.attrs[EXAMPLE_SUMS] = {**group.attrs[EXAMPLE_SUMS], name: checksum_hex(np.asarray(group[name][:]))}


def tree_bytes(root: str | Path) -> dict[str, bytes]:
    """Every file under root by relative path, with its bytes: two stores are equal iff these are."""
    root = Path(root)
    return {f.relative_to(root).as_posix(): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def synthetic_meta(*, family: str = "seq2seq", dtype: str = "bfloat16", tokens: str = "all", num_states: int = 3,
                   d_model: int = 8, max_length: int = 10, block_tokens: int = 24, codec: str = "zstd",
                   task: str = "rte") -> StoreMeta:
    """The metadata an extraction of a made-up model would record (no splits yet)."""
    spec = get_task(task)
    sides = FAMILY_SIDES[family]
    per_token = {side: side == "encoder" and tokens == "all" for side in sides}
    layers = {side: list(range(num_states)) for side in sides}
    block_rows, chunk_rows = block_layout({s: num_states for s in sides}, d_model, dtype, per_token=per_token,
                                          max_length=max_length, block_tokens=block_tokens)
    settings = ExtractionSettings(max_length=max_length, dtype=dtype, tokens=tokens, layers=None, limit=None,
                                  block_tokens=block_tokens, codec=codec)
    uses_words = family != "encoder" and spec.kind == "classification"
    return StoreMeta(
        identity=StoreIdentity(format_version=FORMAT_VERSION, model=f"synthetic-{family}", task=spec.name,
                               settings=settings, template="synthetic"),
        backbone=BackboneInfo(name=f"synthetic-{family}", revision="sha256:synthetic", family=family,
                              model_type="synthetic", d_model=d_model,
                              num_states_encoder=num_states if "encoder" in sides else 0,
                              num_states_decoder=num_states if "decoder" in sides else 0, num_parameters=0),
        task=TaskInfo(name=spec.name, kind=spec.kind, label_names=list(spec.label_names),
                      label_words=list(spec.label_words) if uses_words else [],
                      label_token_ids=list(range(len(spec.label_words))) if uses_words else [],
                      text_fields=list(spec.text_fields), template="synthetic"),
        layout=StoreLayout(layers=layers, per_token=per_token, block_rows=block_rows, chunk_rows=chunk_rows),
        software={"python": "synthetic"},
    )


def make_split(meta: StoreMeta, n: int, rng: np.random.Generator, max_tokens: int) -> SyntheticSplit:
    """Random examples: texts, labels, token counts, and states exactly representable in the stored dtype."""
    spec = get_task(meta.task.name)
    texts = [{f: f"{f} {i} {rng.integers(1 << 30)}" for f in spec.text_fields} for i in range(n)]
    if spec.kind == "classification":
        labels = rng.integers(0, spec.num_labels, n).astype(np.int64)
    else:
        labels = rng.uniform(0, 5, n).astype(np.float32)
    tokens = rng.integers(1, max_tokens + 1, n).astype(np.int64)
    dtype, d = meta.settings.dtype, meta.backbone.d_model
    states = {}
    for side, layers in meta.layout.layers.items():
        rows = tokens if meta.layout.per_token[side] else np.ones(n, dtype=np.int64)
        per_example = []
        for count in rows:
            values = rng.standard_normal((int(count), len(layers), d)).astype(np.float32)
            stored = np.zeros(values.shape, dtype=STORED_DTYPES[dtype])
            logical_view(stored, dtype)[...] = values  # round to the stored dtype, then keep it exact
            per_example.append(np.asarray(logical_view(stored, dtype), dtype=np.float32))
        states[side] = per_example
    token_ids = [rng.integers(0, 1000, int(count)).astype(np.int32) for count in tokens]
    return SyntheticSplit(texts, labels, np.arange(n, dtype=np.int64), tokens, states, token_ids)


def write_synthetic_store(path: str | Path, *, splits: dict[str, int] | None = None, seed: int = 0,
                          max_tokens: int = 10, complete: bool = True, **meta_options) -> SyntheticStore:
    """Write a store of random states through StoreWriter, as an extraction would; return what it holds."""
    meta = synthetic_meta(max_length=max_tokens, **meta_options)
    rng = np.random.default_rng(seed)
    result = SyntheticStore(str(path), meta)
    data = {name: make_split(meta, n, rng, max_tokens) for name, n in (splits or {"train": 20, "validation": 9}).items()}
    identity = StoreIdentity(
        format_version=meta.identity.format_version, model=meta.identity.model, task=meta.identity.task,
        settings=meta.settings,
        data={name: SplitData(source="synthetic", sha256=examples_hash(s.texts, s.labels, s.ids),
                              num_examples=len(s.labels)) for name, s in data.items()},
        template=meta.identity.template,
    )
    result.meta = meta = StoreMeta(identity=identity, backbone=meta.backbone, task=meta.task, layout=meta.layout,
                                   software=meta.software)
    writer = StoreWriter(path, meta)
    if meta.task.label_words:
        result.label_rows = rng.standard_normal((len(meta.task.label_words), meta.backbone.d_model)).astype(np.float32)
        writer.ensure_array("label_rows", result.label_rows)
    layout = meta.layout
    for name, split in data.items():
        rows = {side: split.tokens if layout.per_token[side] else np.ones_like(split.tokens) for side in layout.sides}
        split.plan = plan_blocks(rows, layout.block_rows, layout.chunk_rows)
        ensure_split(writer, name, split)
        result.splits[name] = split
        if complete:
            for block in range(split.plan.num_blocks):
                writer.write_block(name, block, *result.block_buffers(name, block))
            writer.mark_complete(name)
    return result
