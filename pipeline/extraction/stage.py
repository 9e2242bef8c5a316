"""Stage one's work: run a frozen backbone once over a task's splits and fill the store.

Blocks are the unit of work and of resumption: a block is computed, handed to a pool of writer
threads (so the backbone never waits on compression or disk; blocks in flight are bounded), written
as whole shards, and only then marked done.
A rerun skips done blocks; batching happens inside a block, so a resumed block is computed
exactly as it would have been in one uninterrupted run.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.common.config import ExtractConfig
from pipeline.common.errors import (
    DataNotFoundError,
    EmptySplitError,
    PipelineError,
    UnsupportedModelError,
)
from pipeline.common.progress import progress_bar
from pipeline.common.tasks import TaskSpec, get_task
from pipeline.extraction.backbones import (
    Backbone,
    load_backbone,
    model_content_hash,
    model_label_logits,
    resolve_model_path,
    template_of,
)
from pipeline.extraction.glue import GlueSplit, load_split
from pipeline.store import (
    FORMAT_VERSION,
    STORED_DTYPES,
    BlockPlan,
    CacheStore,
    ExtractionSettings,
    SplitData,
    StoreIdentity,
    StoreLayout,
    StoreMeta,
    StoreWriter,
    TaskInfo,
    block_layout,
    check_target,
    examples_hash,
    extraction_hold,
    logical_view,
    path_kind,
    plan_blocks,
    stored_view,
    torch_dtype,
)
from pipeline.store.format import keeps_every_token

log = logging.getLogger(__name__)


# A computed block: stored rows per side, token ids per side, and the event ending their copy from the device.
ComputedBlock = tuple[dict[str, np.ndarray], dict[str, np.ndarray], "torch.cuda.Event | None"]


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("read-pipeline", "torch", "transformers", "zarr", "numcodecs", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length so padded size (count x longest) stays under the budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def copy_states(
    dest: np.ndarray | torch.Tensor,
    dtype: str,
    states: Sequence[torch.Tensor],
    layers: Sequence[int],
    lengths: Sequence[int],
    starts: Sequence[int],
    *,
    pooled: bool,
) -> None:
    """Place one batch's kept states (``states[l]`` for l in ``layers``) into a block buffer: ``StateSink`` for
    states that are all there at once."""
    sink = StateSink(dest, dtype, lengths, starts, pooled=pooled)
    for column, layer in enumerate(layers):
        sink(column, states[layer])


class DeviceRows:
    """The rows a batch keeps of each state, taken on the accelerator: the real tokens' rows (per-token) or each
    example's mean over them in float32 (pooled). Its index tensors are made once, for every state of the batch:
    each is a copy from host memory, which may wait for the device, where the forward is queued ahead."""

    def __init__(self, lengths: Sequence[int], width: int, *, pooled: bool, device: torch.device) -> None:
        self.pooled = pooled
        if pooled:
            self.valid = torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
            self.counts = self.valid.sum(dim=1, keepdim=True).float()
            self.rows = [1] * len(lengths)
        else:
            index = torch.from_numpy(np.concatenate([k * width + np.arange(n) for k, n in enumerate(lengths)]))
            self.index = index.to(device, non_blocking=True)
            self.rows = list(lengths)

    def of(self, state: torch.Tensor) -> torch.Tensor:
        """(kept rows, d) of a (B, T, d) state: (sum of lengths, d), or (B, d) means in float32."""
        if self.pooled:
            return (state.float() * self.valid[..., None]).sum(dim=1) / self.counts
        return state.flatten(0, 1).index_select(0, self.index)

    def places(self, starts: Sequence[int], device: torch.device) -> torch.Tensor:
        """The block rows they go to, each example's from its start."""
        places = np.concatenate([np.arange(start, start + n) for n, start in zip(self.rows, starts)])
        return torch.from_numpy(places).to(device, non_blocking=True)


class StateSink:
    """Places a batch's states into a block buffer (stored representation, e.g. bf16 bits) one at a time, as the
    forward makes them (``Backbone.forward``'s ``take``): ``sink(column, state)`` puts a (B, T, d) state's kept
    rows in the block's ``column``. Per-token: example k fills rows ``[starts[k], starts[k] + lengths[k])`` (real
    tokens first); pooled: one row at ``starts[k]``, the mean over the example's tokens in float32.

    A host block (numpy) takes each (example, state) slice straight from the model's output, converted on the way
    (numpy/ml_dtypes casts: round to nearest even, bit-identical to ``Tensor.to``): one pass, no temporaries, and
    no torch intra-op threads (thousands of small parallel torch copies stall on thread hand-offs, worst of all
    on a busy machine). A block on a device (a tensor) is filled there: gathered, converted and scattered, a state
    at a time (a (rows, layers, d) stack of T5-base's 13 float32 states would cost 0.6 GB for a batch of 16,384
    tokens, twice over while stacked), with index tensors made at the batch's first state for all of them.
    """

    def __init__(self, dest: np.ndarray | torch.Tensor, dtype: str, lengths: Sequence[int], starts: Sequence[int],
                 *, pooled: bool) -> None:
        self.dest, self.dtype, self.lengths, self.starts, self.pooled = dest, dtype, lengths, starts, pooled
        self._kept: tuple[DeviceRows, torch.Tensor] | None = None

    def __call__(self, column: int, state: torch.Tensor) -> None:
        if isinstance(self.dest, torch.Tensor):
            self._on_device(column, state)
            return
        target = logical_view(self.dest, self.dtype)
        h = logical_view(state.cpu())  # (not the pipeline's way: a device's states go into a device block)
        for k, (n, start) in enumerate(zip(self.lengths, self.starts)):
            if self.pooled:
                target[start, column] = h[k, :n].astype(np.float32, copy=False).mean(axis=0) if n > 1 else h[k, 0]
            else:
                target[start : start + n, column] = h[k, :n]

    def _on_device(self, column: int, state: torch.Tensor) -> None:
        if self._kept is None:
            kept = DeviceRows(self.lengths, state.shape[1], pooled=self.pooled, device=state.device)
            self._kept = kept, kept.places(self.starts, self.dest.device)
        kept, places = self._kept
        self.dest[:, column].index_copy_(0, places, kept.of(state).to(self.dest.dtype))


def into_sinks(sinks: Mapping[str, StateSink],
               layers: Mapping[str, Sequence[int]]) -> Callable[[str, int, torch.Tensor], None]:
    """``Backbone.forward``'s ``take``: each state a side keeps (``layers``) into that side's sink, at its column;
    the others pass by."""
    columns = {side: {state: j for j, state in enumerate(kept)} for side, kept in layers.items()}

    def take(side: str, state: int, values: torch.Tensor) -> None:
        column = columns.get(side, {}).get(state)
        if column is not None:
            sinks[side](column, values)

    return take


def select_layers(layers: Sequence[int] | None, num_states: int) -> list[int]:
    """Resolve --layers against one side's L+1 states; the final state must stay (heads read it)."""
    if layers is None:
        return list(range(num_states))
    resolved = sorted({layer % num_states if -num_states <= layer < num_states else -1 for layer in layers})
    if -1 in resolved:
        raise UnsupportedModelError(f"--layers {list(layers)} names a layer outside 0..{num_states - 1}")
    if resolved[-1] != num_states - 1:
        raise UnsupportedModelError(
            f"--layers must include the final state ({num_states - 1} or -1): the side network corrects it"
        )
    return resolved


def gather_splits(cfg: ExtractConfig, task: TaskSpec) -> dict[str, GlueSplit]:
    """Load every requested split before the model, so data errors come first and fast."""
    explicit = cfg.splits is not None
    data: dict[str, GlueSplit] = {}
    for name in cfg.splits or task.splits:
        try:
            data[name] = load_split(task, name, cfg.glue_dir, limit=cfg.limit)
        except DataNotFoundError as exc:
            if explicit:
                raise
            if name in ("train",) or name in task.validation_splits:  # the default's required splits
                raise DataNotFoundError(f"{exc}; without --splits, train and {', '.join(task.validation_splits)} "
                                        f"are required (--splits names the ones to extract, e.g. --splits "
                                        f"{task.validation_splits[0]})") from None
            log.info("skipping %s/%s: not in the data source (unlabeled test split)", task.name, name)
    return data


def split_data(split: GlueSplit) -> SplitData:
    """A split's data identity: its source and a hash of its examples in order.

    A local file is named by its place in the glue_data layout (``local:RTE/dev.tsv``), not by where
    that folder lies on this machine: the same examples read from another checkout or machine make the
    same store (the same bytes, the same DVC hash); other examples differ by their hash.
    """
    kind, _, where = split.source.partition(":")
    if kind == "local":
        where = "/".join(Path(where).parts[-2:])
    return SplitData(source=f"{kind}:{where}", sha256=examples_hash(split.texts, split.labels, split.ids),
                     num_examples=len(split))


def store_identity(cfg: ExtractConfig, data: dict[str, GlueSplit], model: str, template: str) -> StoreIdentity:
    """What decides the store's content, computable before the backbone loads (``model``: its revision;
    ``template``: how its family reads an example, from its config alone)."""
    settings = ExtractionSettings(
        max_length=cfg.max_length, dtype=cfg.dtype, tokens=cfg.tokens, layers=cfg.layers, limit=cfg.limit,
        block_tokens=cfg.block_tokens, codec=cfg.codec,
    )
    return StoreIdentity(format_version=FORMAT_VERSION, model=model, task=get_task(cfg.task).name,
                         settings=settings, data={name: split_data(split) for name, split in data.items()},
                         template=template)


def model_identity(revision: str, name: str) -> str:
    """The weights' identity: their revision (so a moved folder is the same model), else the name."""
    return name if revision == "unknown" else revision


class Extraction:
    """Holds the loaded backbone and the open store while splits are extracted."""

    def __init__(self, cfg: ExtractConfig, *, progress: bool = True, data: dict[str, GlueSplit] | None = None,
                 backbone: Backbone | None = None) -> None:
        """``backbone``: one already loaded for ``cfg`` (its model, dtype and device), e.g. reused across stores."""
        self.cfg = cfg
        self.progress = progress
        self.task = get_task(cfg.task)
        self.data = gather_splits(cfg, self.task) if data is None else data
        for name, split in self.data.items():
            if len(split) == 0:
                raise EmptySplitError(f"split {name!r} of {self.task.name} has no examples")
        self.backbone = backbone or load_backbone(cfg.model, dtype=cfg.dtype, device=cfg.device)
        self.backbone.check_max_length(cfg.max_length)
        self.label_ids = self.backbone.label_token_ids(self.task)
        self.label_rows = self.backbone.label_rows(self.task)
        bb = self.backbone
        states = {"encoder": bb.n_layers_encoder, "decoder": bb.n_layers_decoder}
        self.layers = {side: select_layers(cfg.layers, n) for side, n in states.items() if n}
        self.per_token = {side: keeps_every_token(side, cfg.tokens) for side in self.layers}
        self.limits, self.chunk_rows = block_layout(
            {side: len(layers) for side, layers in self.layers.items()}, bb.d_model, cfg.dtype,
            per_token=self.per_token, max_length=cfg.max_length, block_tokens=cfg.block_tokens,
        )
        self.meta = self._meta()
        self.writer = StoreWriter(cfg.out_path, self.meta, overwrite=cfg.overwrite, precision=self.backbone.precision)
        if self.label_rows is not None:
            self.writer.ensure_array("label_rows", self.label_rows)
        self.checked_label_rows = False

    def _meta(self) -> StoreMeta:
        cfg, bb, task = self.cfg, self.backbone, self.task
        return StoreMeta(
            identity=store_identity(cfg, self.data, model_identity(bb.revision, bb.name), bb.template),
            backbone=bb.info(),
            task=TaskInfo(
                name=task.name, kind=task.kind, label_names=list(task.label_names),
                label_words=list(task.label_words) if self.label_ids else [],
                label_token_ids=list(self.label_ids or []), text_fields=list(task.text_fields),
                template=bb.template,
            ),
            layout=StoreLayout(layers=self.layers, per_token=self.per_token, block_rows=self.limits,
                               chunk_rows=self.chunk_rows),
            software=software_versions(),
        )

    # ---- one split ----------------------------------------------------------------------------
    def run_split(self, name: str, *, max_blocks: int | None = None) -> None:
        cfg, bb, split = self.cfg, self.backbone, self.data[name]
        token_ids = bb.tokenize(self.task, split.texts, cfg.max_length)
        n_tokens = np.array([len(t) for t in token_ids], dtype=np.int64)
        rows = {side: (n_tokens if self.per_token[side] else np.ones_like(n_tokens)) for side in self.layers}
        plan = plan_blocks(rows, self.limits, self.chunk_rows)
        lengths = {side: (n_tokens if side == "encoder" else np.ones_like(n_tokens)) for side in self.layers}
        self.writer.ensure_split(name, labels=split.labels, ids=split.ids, plan=plan, lengths=lengths,
                                 data=self.meta.identity.data[name])
        index, count = cfg.part_index
        # --part I/N: this process owns blocks j with j % N == I, so parts never share a shard.
        mine = [j for j in range(plan.num_blocks) if j % count == index]
        done = self.writer.done_blocks(name)
        # A resume first checks the blocks written before: a damaged one is written again.
        damaged = self.writer.recheck(name, [j for j in mine if done[j]])
        for problem in damaged.values():
            log.warning("%s: %s; re-extracting it", cfg.out_path, problem)
        todo = [j for j in mine if not done[j] or j in damaged]
        written = len(mine) - len(todo)
        if max_blocks is not None:
            todo = todo[:max_blocks]
        if not todo:
            self.writer.mark_complete(name)
            return
        self.writer.check_precision(name)
        if written:  # said always, as a checkpoint's resume is: it is about the user's files
            note = (f"resuming {cfg.out_path}: split {name!r} has {written} of {len(mine)} blocks "
                    f"{'of this part ' if count > 1 else ''}written; extracting the other {len(mine) - written}")
            log.info(note)
            print(note, file=sys.stderr)
        total = int(sum(plan.block_starts[j + 1] - plan.block_starts[j] for j in todo))
        bar = progress_bar(total=total, desc=f"{self.task.name}/{name}", unit="ex", enabled=self.progress)
        started, seen_tokens = time.perf_counter(), 0
        # A pool of writers: blocks compress and write in parallel (zarr and blosc release the GIL), each
        # marked done only after its own shards and checksum; at most writers + 1 blocks in flight.
        with ThreadPoolExecutor(max_workers=cfg.writers, thread_name_prefix="zarr-writer") as pool:
            pending: list[Future] = []
            for j in todo:
                lo, hi = int(plan.block_starts[j]), int(plan.block_starts[j + 1])
                block = self._compute_block(token_ids[lo:hi], plan, j, lo)
                while len(pending) > cfg.writers:
                    pending.pop(0).result()
                pending.append(pool.submit(self._write, name, j, block))
                seen_tokens += int(n_tokens[lo:hi].sum())
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.update(hi - lo)
                bar.set_postfix_str(f"{seen_tokens / elapsed:,.0f} tok/s")
            for future in pending:
                future.result()
        bar.close()
        if not self.writer.mark_complete(name):
            log.warning("%s/%s: this part is done; the split completes when every part has run", self.task.name, name)

    def _write(self, name: str, j: int, block: ComputedBlock) -> None:
        """Writer thread: wait for the block's device-to-host copy (if any), then write it."""
        hidden, ids, copied = block
        if copied is not None:
            copied.synchronize()
        self.writer.write_block(name, j, hidden, ids)

    def _compute_block(self, token_ids: list[list[int]], plan: BlockPlan, block: int, first: int) -> ComputedBlock:
        """One block's stored rows and token ids; on CUDA, with the event that ends their copy to the host.

        On an accelerator the block is assembled in device memory and crosses to pinned host memory in
        one asynchronous copy: the forward of the next block is queued at once.
        """
        cfg, bb = self.cfg, self.backbone
        on_device = bb.device.type == "cuda"
        shapes = {side: (plan.capacity[side], len(layers), bb.d_model) for side, layers in self.layers.items()}
        hidden: dict[str, Any] = {
            side: torch.zeros(shape, dtype=torch_dtype(cfg.dtype), device=bb.device) if on_device
            else np.zeros(shape, dtype=STORED_DTYPES[cfg.dtype])
            for side, shape in shapes.items()
        }
        ids_out = {side: np.full(plan.capacity[side], -1, dtype=np.int32) for side in self.layers if self.per_token[side]}
        base = {side: block * plan.capacity[side] for side in self.layers}
        for batch in length_batches([len(t) for t in token_ids], cfg.batch_tokens):
            batch_ids = [token_ids[i] for i in batch]
            lengths = bb.state_lengths(batch_ids)
            starts = {side: [int(plan.offsets[side][first + i, 0]) - base[side] for i in batch] for side in self.layers}
            sinks = {side: StateSink(hidden[side], cfg.dtype, lengths[side], starts[side],
                                     pooled=not self.per_token[side]) for side in self.layers}
            keep = into_sinks(sinks, self.layers)
            final: list[torch.Tensor] = []  # the decoder's last state, for the label rows' check

            def take(side: str, state: int, values: torch.Tensor) -> None:
                """A state as the model makes it: its kept rows go straight into the block, and nothing holds it."""
                if side == "decoder" and state == bb.n_layers_decoder - 1:
                    final.append(values)
                keep(side, state, values)

            out = bb.forward(batch_ids, take)
            self._check_label_rows(final, out.get("logits"), batch_ids)
            for side in ids_out:
                for start, ids in zip(starts[side], batch_ids):
                    ids_out[side][start : start + len(ids)] = ids
            del out
        if not on_device:
            return hidden, ids_out, None
        host = {side: torch.empty(shapes[side], dtype=torch_dtype(cfg.dtype), pin_memory=True) for side in hidden}
        for side, rows in hidden.items():
            host[side].copy_(rows, non_blocking=True)
        copied = torch.cuda.Event(blocking=True)  # a writer thread waiting for it sleeps instead of spinning a core
        copied.record(torch.cuda.current_stream(bb.device))  # the copies' stream: the backbone's device, maybe not 0
        return {side: stored_view(rows, cfg.dtype) for side, rows in host.items()}, ids_out, copied

    def _check_label_rows(self, decoder_final: Sequence[torch.Tensor], logits: torch.Tensor | None,
                          batch: list[list[int]]) -> None:
        """Once per run: the stored label rows must reproduce the model's own label logits (``logits``, the
        seq2seq model's at decoder position 0, or computed here) from the decoder's last state."""
        if self.checked_label_rows or self.label_rows is None:
            return
        self.checked_label_rows = True
        final = decoder_final[0][: min(4, len(batch)), 0].float().cpu()  # (b, d): last state, one position
        ours = final @ torch.from_numpy(self.label_rows).T
        if logits is not None:
            theirs = logits[: len(final)][:, self.label_ids].float().cpu()
        else:
            theirs = model_label_logits(self.backbone, batch[: len(final)], self.label_ids)
        tol = 1e-2 * (1 + theirs.abs().max().item()) if self.backbone.autocast_dtype else 1e-3 * (1 + theirs.abs().max().item())
        if not torch.allclose(ours, theirs, atol=tol, rtol=0):
            raise UnsupportedModelError(
                f"{self.backbone.name}: label rows of the LM head do not reproduce the model's own logits "
                f"(max difference {(ours - theirs).abs().max().item():.3g}); its head has extra terms "
                "(bias, soft-capping, scaling) that this pipeline does not store"
            )

    def run(self, *, max_blocks: int | None = None) -> str:
        for name in self.data:
            self.run_split(name, max_blocks=max_blocks)
        return self.cfg.out_path


def finished_store(cfg: ExtractConfig, data: dict[str, GlueSplit] | None = None) -> bool:
    """True if cfg.out already holds every requested split, complete and intact, as the same store.

    "The same store" is the fingerprint's identity: model, task, settings, and the data (source and a
    hash of the examples), so a store built from other data is stale. Intact: every block's shards
    match their checksums (this reads the store once). Checked before the backbone is loaded.
    """
    if cfg.overwrite or path_kind(cfg.out_path) not in ("store", "remote"):
        return False
    try:
        store = CacheStore(cfg.out_path)
    except (PipelineError, FileNotFoundError):
        return False
    path = resolve_model_path(cfg.model)
    if not Path(path).is_dir():
        return False  # a Hub model's revision is known only once it is loaded
    data = gather_splits(cfg, get_task(cfg.task)) if data is None else data
    try:
        template = template_of(path)
    except (OSError, ValueError, PipelineError):  # no readable config: loading the model will say why
        return False
    wanted = store_identity(cfg, data, model_identity(model_content_hash(path, None), cfg.model), template)
    if not set(wanted.data) <= set(store.splits) or wanted.mismatch(store.meta.identity):
        return False
    try:
        if store.label_rows() is None and store.meta.task.label_token_ids:
            return False  # the head's label rows are gone: the extraction writes them again
        for name in wanted.data:
            split = store.split(name)
            if not split.blocks_done().all() or split.damaged_blocks(range(split.num_blocks)):
                return False
    except PipelineError:  # a damaged per-example array: the extraction writes it again
        return False
    return True


def extract(cfg: ExtractConfig, *, progress: bool = True) -> str:
    """Stage one end to end; returns the store path. Idempotent: a finished store is not recomputed.

    The data is read first (its errors come before any model loads) and defines the store's identity.
    An extraction holds the store's lock while it runs: a whole one alone, --part processes together, so a
    second whole one, or a part beside a whole one, refuses at once.
    """
    data = gather_splits(cfg, get_task(cfg.task))
    whole = cfg.part_index == (0, 1)
    if whole and finished_store(cfg, data):
        log.info("%s is complete with these settings and data; nothing to do", cfg.out_path)
        return cfg.out_path
    check_target(cfg.out_path, overwrite=cfg.overwrite)  # before any lock file or model load
    with extraction_hold(cfg.out_path, whole=whole):
        return Extraction(cfg, progress=progress, data=data).run()
