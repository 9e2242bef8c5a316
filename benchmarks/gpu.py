"""Both stages on one accelerator, side by side on the same tokens, in one process.

Run from the repository root (about 5 minutes on one H100/H200 with the t5-base shape on RTE):

    .venv/bin/python benchmarks/gpu.py --task rte --glue-dir /path/to/glue_data

It builds a randomly initialised model of ``--shape`` (default t5-base, via ``pipeline.extraction.shapes``;
its tokenizer is trained on GLUE text from ``--glue-dir`` or copied from ``--tokenizer``), loads it once,
and measures on the task's train split (``--limit`` examples, default all):

1. a plain forward epoch: the frozen model over the extraction's own batches, nothing kept;
2. extraction of the train split into a per-token and a pooled store (``Extraction.run_split``, the
   loaded model reused through ``Extraction(cfg, backbone=...)``), and into a pooled store in batches of
   fine-tuning's size (``--finetune-batch-tokens``), for a peak memory at the same batch;
3. stage two for 1 and ``--seeds`` seeds on each store: reading the store (``Trainer`` construction)
   then one epoch (``Trainer.train_epoch``, timed after one warm-up epoch), then an evaluation (``Trainer.evaluate``);
4. one epoch of full fine-tuning of the same model (every weight trained, AdamW, bf16 autocast on CUDA);
5. last, the paths that first run here: stage two with ``--cuda-graphs`` (the eager step recorded as CUDA
   graphs; full float32, as the eager rows) on both stores for 1 and ``--seeds`` seeds, then with ``--tf32``,
   and streamed two blocks at a time from pinned host memory (``memory_budget=0``, ``shuffle_buffer=2``: the rows
   not held on the GPU, for its memory); the eager step streamed from pinned host memory; the eager step with GRU
   layer steps in torch operators; the per-token store streamed from the store, decoded every epoch
   (``memory_budget=0``, ``host_memory_budget=0``); and (unless ``--no-compiled``) ``--compile --cuda-graphs --tf32`` (torch.compile's
   own graphs) held and streamed, and ``--compile`` for ``--seeds`` and 1 seeds, whose warm-up epochs pay the
   compile.

A phase that fails (after the plain forward: the extractions, every stage-two row, fine-tuning) is reported
in its row, its traceback goes to stderr and into ``--results``, and the run goes on with the phases that do
not need it: the first run on a new machine measures all it can.

For each: wall seconds, peak CUDA memory and energy (NVML when ``pynvml`` is installed; RAPL for the
CPU when readable) via ``pipeline.common.resources.ResourceMeter``. The "## GPU" section of
``--benchmarks`` (default BENCHMARKS.md) is rewritten with the card's name and the command.
``--results FILE`` saves the raw figures after every phase, so a run cut short keeps what it measured,
and ``--render FILE`` rewrites the section from such a file without running anything. With
``--shape t5-tiny --device cpu --limit 64`` the whole run takes seconds on a CPU (the test runs it so).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import faulthandler
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np
import torch
from extract import Clock, machine, plain_forward, planned_batches
from quality import write_section

from pipeline.common.config import ExtractConfig, TrainConfig
from pipeline.common.files import atomic_write_text
from pipeline.common.resources import ResourceMeter, pick_device
from pipeline.extraction import Extraction
from pipeline.extraction.backbones import Backbone, load_backbone
from pipeline.extraction.shapes import build_random_backbone
from pipeline.extraction.stage import gather_splits
from pipeline.training import Trainer, fused_gru
from pipeline.training.trainer import EVAL_BATCH_EXAMPLES

SECTION = "## GPU"


def measured(device: torch.device, fn: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    """(wall s, peak CUDA MiB, energies) of ``fn()``, the device drained before the clock stops."""
    with ResourceMeter(device) as meter:
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    s = meter.summary()
    return {"wall": s["wall_time_s"], "peak_mb": s["cuda_max_allocated_mb"], "gpu_j": s["gpu_energy_j"],
            "cpu_j": s["cpu_energy_j"]}, result


def disk_write_mib_s(folder: Path, mib: int = 1024, *, fsync: bool = True) -> float:
    """Sequential write rate into ``folder`` (random bytes). ``fsync``: until the disk has them, what a sustained
    write can reach; else until the page cache has them, as a store's writes do (they are not fsync'd)."""
    block = np.random.default_rng(0).integers(0, 256, 64 * 2**20, dtype=np.uint8).tobytes()
    path = folder / "disk-probe.bin"
    started = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(max(1, mib // 64)):
            handle.write(block)
        handle.flush()
        if fsync:
            os.fsync(handle.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return max(1, mib // 64) * 64 / seconds


def extraction_config(args: argparse.Namespace, model: Path, out: Path, tokens: str,
                      batch_tokens: int | None = None) -> ExtractConfig:
    return ExtractConfig(model=str(model), task=args.task, out=str(out), glue_dir=args.glue_dir,
                         splits=("train", "validation"), max_length=args.max_length,
                         batch_tokens=batch_tokens or args.batch_tokens,
                         dtype="bfloat16", device=args.device, tokens=tokens, limit=args.limit, overwrite=True,
                         writers=args.writers)


def stage_two(args: argparse.Namespace, cache: Path, seeds: int, device: torch.device, compiled: bool = False,
              cuda_graphs: bool = False, tf32: bool = False, memory_budget: str | int = "8GB", shuffle_buffer: int = 8,
              fused_gru_cell: bool = True, host_memory_budget: str | int = "16GB") -> dict[str, Any]:
    """Reading the store, then one timed epoch after a warm-up epoch (allocator, kernels; the compile, the
    recording of the graphs), then an evaluation. ``fused_gru_cell=False``: eager GRU layer steps in torch operators,
    as before the fused kernels."""
    if not fused_gru_cell:
        with _composite_gru_steps():
            return stage_two(args, cache, seeds, device, compiled, cuda_graphs, tf32, memory_budget, shuffle_buffer,
                             host_memory_budget=host_memory_budget)
    cfg = TrainConfig(cache=str(cache), out=str(cache.parent / f"run-{cache.stem}-{seeds}"), seeds=tuple(range(seeds)),
                      epochs=2, device=args.device, patience=None, rnn_dim=args.rnn_dim, batch_size=args.batch_size,
                      compile=compiled, cuda_graphs=cuda_graphs, tf32=tf32, memory_budget=memory_budget,
                      host_memory_budget=host_memory_budget,
                      shuffle_buffer=shuffle_buffer)
    read, trainer = measured(device, lambda: Trainer(cfg, progress=False))
    optimizer, scheduler = trainer.optimizer()
    warm_up, _ = measured(device, lambda: trainer.train_epoch(1, optimizer, scheduler))
    epoch, _ = measured(device, lambda: trainer.train_epoch(2, optimizer, scheduler))
    evaluation, _ = measured(device, trainer.evaluate)  # what a run does after each epoch: its peak counts too
    # Of "reading it": the seconds spent reading the store's states (decoding and checking them) for the training
    # and evaluation splits; the rest is opening the store, the copy to the device and building the model.
    splits = [trainer.train_data, *trainer.eval_data.values()]
    store_reads = sum(data.read_seconds for data in splits)
    copies = sum(data.copy_seconds for data in splits)
    return {"read": {**read, "store_reads_s": store_reads, "copies_s": copies}, "warm_up": warm_up, "epoch": epoch,
            "evaluation": evaluation, "in_memory": trainer.train_data.in_memory, "on_device": str(trainer.train_data.device),
            "host_held": trainer.train_data.host_held}


@contextmanager
def _composite_gru_steps() -> Iterator[None]:
    """Eager GRU layer steps in torch operators even on CUDA (``fused_gru.applies`` says no)."""
    applies = fused_gru.applies
    fused_gru.applies = lambda x: False
    try:
        yield
    finally:
        fused_gru.applies = applies


def finetune(backbone: Backbone, model_path: Path, batches: list[list[list[int]]], labels: list[int],
             device: torch.device) -> dict[str, Any]:
    """Full fine-tuning timed as stage two is: a warm-up epoch (allocator, kernels), then one timed epoch.
    The seq2seq model learns to emit the label word (encoders: a mean-pool head)."""
    from torch import nn
    from transformers import AutoModel, AutoModelForSeq2SeqLM

    seq2seq = backbone.family == "seq2seq"
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModel).from_pretrained(str(model_path)).to(device)
    head = None if seq2seq else nn.Linear(backbone.d_model, max(labels) + 1).to(device)
    params = list(model.parameters()) + ([] if head is None else list(head.parameters()))
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    pad_id = backbone.tokenizer.pad_token_id or 0
    model.train()

    def epoch() -> None:
        """One epoch over the length-sorted batches."""
        start = 0
        for batch in batches:
            width = max(len(ids) for ids in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, tokens in enumerate(batch):
                ids[row, : len(tokens)], mask[row, : len(tokens)] = torch.tensor(tokens), 1
            target = torch.tensor(labels[start : start + len(batch)], dtype=torch.long, device=device)
            start += len(batch)
            ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
            with autocast:
                if seq2seq:
                    loss = model(input_ids=ids, attention_mask=mask, labels=target[:, None]).loss
                else:
                    states = model(input_ids=ids, attention_mask=mask).last_hidden_state
                    m = mask[..., None].to(states.dtype)
                    loss = nn.functional.cross_entropy(head((states * m).sum(1) / m.sum(1)).float(), target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    warm_up, _ = measured(device, epoch)
    timed, _ = measured(device, epoch)
    return {"warm_up": warm_up, "epoch": timed}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.stacks_after:  # a run that hangs says where before an outer `timeout` kills it
        faulthandler.dump_traceback_later(args.stacks_after, exit=False)
    device = pick_device(args.device)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-bench-"))
    started = time.perf_counter()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result: dict[str, Any] = {"device": str(device), "card": card, "machine": machine(), "torch": torch.__version__,
                              "date": _dt.date.today().isoformat(), "command": args.command,
                              "args": {k: v for k, v in vars(args).items() if k not in ("render", "command")}}

    def keep(key: str, value: Any) -> None:
        """Record a phase's figures, and save them all at once: a run cut short keeps what it measured."""
        result[key] = value
        result["total_s"] = time.perf_counter() - started
        if args.results:
            atomic_write_text(Path(args.results), json.dumps(result, indent=1, sort_keys=True) + "\n")

    def attempt(key: str, fn: Callable[[], Any]) -> bool:
        """Run one phase and keep its figures, or its error: one line for the table, the traceback for whoever
        reads the results file. A phase that fails where it first runs leaves the others standing."""
        print(f"[{time.perf_counter() - started:6.1f} s] {key}", file=sys.stderr, flush=True)
        try:
            keep(key, fn())
            return True
        except Exception as error:
            trace = traceback.format_exc()
            print(trace, file=sys.stderr, flush=True)
            keep(key, {"error": " ".join(f"{type(error).__name__}: {error}".split()).replace("|", "/")[:300],
                       "trace": trace[-6000:]})
            return False

    model_path = build_random_backbone(args.shape, work / "model", glue_dir=args.glue_dir, tokenizer=args.tokenizer)
    backbone = load_backbone(str(model_path), dtype="bfloat16", device=args.device)
    data = gather_splits(extraction_config(args, model_path, work / "x.zarr", "all"), _task(args.task))
    keep("examples", len(data["train"]))
    keep("codec", extraction_config(args, model_path, work / "x.zarr", "all").codec)  # the pipeline's default
    keep("disk_mib_s", disk_write_mib_s(work, args.disk_probe_mib))
    keep("buffered_mib_s", disk_write_mib_s(work, args.disk_probe_mib, fsync=False))
    extractions = {}

    def extract(ext: Extraction) -> dict[str, Any]:
        clock = Clock()  # the writer threads' busy seconds, summed: near writers x wall means they are the limit
        ext.writer.write_block = clock.wrap("write", ext.writer.write_block)
        figures = measured(device, lambda: ext.run_split("train"))[0]
        busy = clock.wall.get("write", 0.0)
        ext.run_split("validation")
        store = Path(ext.cfg.out_path)
        return {**figures, "writers_busy_s": busy,
                "disk_bytes": sum(f.stat().st_size for f in store.rglob("*") if f.is_file())}

    for tokens in ("all", "pooled"):
        ext = Extraction(extraction_config(args, model_path, work / f"{tokens}.zarr", tokens), progress=False,
                         data=data, backbone=backbone)
        if tokens == "all":
            batches, tokens_count, blocks = planned_batches(ext, "train")
            keep("tokens", tokens_count)
            keep("blocks", blocks)
            # Warm-up over every batch, as stage two's epochs are timed after one: each padded width meets its
            # kernels (cuBLAS heuristics, autocast casts) once before the clock runs.
            plain_forward(backbone, batches)
            keep("plain", measured(device, lambda batches=batches: plain_forward(backbone, batches))[0])

        if attempt(f"extract_{tokens}", lambda ext=ext: extract(ext)):
            extractions[tokens] = Path(ext.cfg.out_path)
    # Peak memory is compared with fine-tuning's, whose batches are smaller: the pooled store (where stage two is
    # small) extracted in batches of fine-tuning's size says what READ needs at the same batch.
    in_ft_batches = Extraction(extraction_config(args, model_path, work / "pooled-ft-batches.zarr", "pooled",
                                                 batch_tokens=args.finetune_batch_tokens),
                               progress=False, data=data, backbone=backbone)
    attempt("extract_pooled_ft_batches", lambda: extract(in_ft_batches))
    for tokens, cache in extractions.items():
        for seeds in (1, args.seeds):
            attempt(f"train_{tokens}_{seeds}", lambda cache=cache, seeds=seeds: stage_two(args, cache, seeds, device))
    token_ids = backbone.tokenize(_task(args.task), data["train"].texts, args.max_length)
    label_ids = backbone.label_token_ids(_task(args.task))
    targets = [label_ids[int(y)] if label_ids else int(y) for y in data["train"].labels]
    order = np.argsort([-len(t) for t in token_ids], kind="stable")
    ft_batches, ft_labels, current = [], [], []
    for i in order:  # padded tokens per batch <= --finetune-batch-tokens (backward holds every activation)
        if current and (len(current) + 1) * len(token_ids[current[0]]) > args.finetune_batch_tokens:
            ft_batches.append([token_ids[j] for j in current])
            current = []
        current.append(int(i))
        ft_labels.append(targets[i])
    ft_batches.append([token_ids[j] for j in current])
    backbone.model = None  # the frozen copy's memory goes back before the trainable one loads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    attempt("finetune", lambda: finetune(backbone, model_path, ft_batches, ft_labels, device))
    if "all" not in extractions:
        return result
    # Then the paths that first run here, the most promising first: a run cut short keeps them. Recorded CUDA graphs
    # (--cuda-graphs) in full float32, as the eager rows, for both stores; then with --tf32, and streamed.
    S = args.seeds
    optional: dict[str, dict[str, Any]] = {
        **{f"recorded_{tokens}_{seeds}": dict(seeds=seeds, cuda_graphs=True, tokens=tokens)
           for tokens in ("all", "pooled") if tokens in extractions for seeds in (S, 1)},
        f"recorded_tf32_all_{S}": dict(seeds=S, cuda_graphs=True, tf32=True),
        f"recorded_streamed_all_{S}": dict(seeds=S, cuda_graphs=True, memory_budget=0, shuffle_buffer=2),
        f"host_all_{S}": dict(seeds=S, memory_budget=0),  # from pinned host memory: copies on a side stream
        f"composite_all_{S}": dict(seeds=S, fused_gru_cell=False),  # the eager step before the fused cell kernels
        f"streamed_all_{S}": dict(seeds=S, memory_budget=0, host_memory_budget=0)}  # the store decoded every epoch
    if args.compiled:  # torch.compile's own graphs (reduce-overhead), and the compiled step alone
        optional.update({f"graphs_all_{S}": dict(seeds=S, compiled=True, cuda_graphs=True, tf32=True),
                         f"graphs_streamed_all_{S}": dict(seeds=S, compiled=True, cuda_graphs=True, tf32=True,
                                                          memory_budget=0, shuffle_buffer=2)})
        optional.update({f"compiled_all_{seeds}": dict(seeds=seeds, compiled=True) for seeds in (S, 1)})
    for key, options in optional.items():
        cache = extractions[options.pop("tokens", "all")]
        attempt(key, lambda options=options, cache=cache: stage_two(args, cache, device=device, **options))
    return result


def _task(name: str):
    from pipeline.common.tasks import get_task

    return get_task(name)


def render(r: dict[str, Any], command: str) -> str:
    """The "## GPU" section from a run's results (``run``'s dict, or its ``--results`` file)."""
    a = argparse.Namespace(**r["args"])
    card = r.get("card") or "no GPU (CPU run)"
    plain, S = r["plain"]["wall"], a.seeds
    ext_all = r.get("extract_all") or {}
    codec = r.get("codec", "blosc-zstd")  # runs that did not record it wrote blosc-zstd, then the default

    def disk(tokens: str) -> float:
        """MiB on disk of the ``tokens`` store (nan when its extraction failed)."""
        return r.get(f"extract_{tokens}", {}).get("disk_bytes", float("nan")) / 2**20

    def busy(tokens: str) -> str:
        """The writer threads' busy time of an extraction, where the run measured it."""
        seconds = r.get(f"extract_{tokens}", {}).get("writers_busy_s")
        return "" if seconds is None else f"; writers busy {seconds:.1f} s in all ({a.writers} threads)"

    def row(label: str, m: dict[str, Any] | None, note: str = "") -> str:
        def cell(v: Any, digits: int = 1) -> str:
            return "n/a" if v is None else f"{v:,.{digits}f}"
        if m is None:
            return f"| {label} | not measured (the run ended first) | | | | | |"
        if "error" in m:
            return f"| {label} | failed: {m['error']} | | | | | |"
        return (f"| {label} | {m['wall']:.2f} | {m['wall'] / plain:.2f} | {cell(m['peak_mb'], 0)} | "
                f"{cell(m['gpu_j'])} | {cell(m['cpu_j'])} | {note} |")

    def stage_two_rows(key: str, name: str, seeds: int) -> list[str]:
        t = r.get(key)
        if t is None or "error" in t:
            return [row(f"{name}, {seeds} seed(s)", t)]
        where = (f"rows on {t['on_device']}" if t["in_memory"] else
                 "streamed from pinned host memory" if t.get("host_held") else "streamed from the store")
        reads, copies = t["read"].get("store_reads_s"), t["read"].get("copies_s")
        return [row(f"{name}: reading it, {seeds} seed(s)", t["read"],
                    ("" if reads is None else f"of which reading the states: {reads:.2f} s")
                    + ("" if copies is None else f", copying them to the device: {copies:.2f} s")),
                row(f"{name}: warm-up epoch, {seeds} seed(s)", t["warm_up"], "first epoch: allocator, kernels"
                    + (", the compile" if key.startswith(("compiled", "graphs")) else "")
                    + (", a graph per token bucket" if key.startswith("graphs") else "")
                    + (", each batch shape's first step eager, its second recorded" if key.startswith("recorded")
                       else "")),
                row(f"{name}: one epoch, {seeds} seed(s)", t["epoch"], where),
                *([row(f"{name}: evaluation, {seeds} seed(s)", t["evaluation"],
                       f"selection and validation splits, batches of {max(a.batch_size, EVAL_BATCH_EXAMPLES)} examples")]
                  if "evaluation" in t else [])]  # runs before 2026-11-28 (later) had no evaluation phase

    lines = [SECTION, "",
             f"Card: **{card}**; {r['machine']}; torch {r['torch']}; {r['date']}. Model: random `{a.shape}` shape "
             f"(speed does not depend on the weights' values; bf16 autocast on CUDA), task {a.task} train: "
             f"{r['examples']:,} examples, {r['tokens']:,} tokens, {r['blocks']} block(s); max_length {a.max_length}, "
             f"batch_tokens {a.batch_tokens}, {a.writers} writer threads, codec {codec}. Stage two: GRU "
             f"r={a.rnn_dim}, batch {a.batch_size}, one epoch timed after a warm-up epoch, float32 unless a row says --tf32. Energy: NVML "
             f"(GPU) and RAPL (CPU) where readable, else n/a. Whole run {r['total_s']:.0f} s.", "",
             "| phase (same tokens) | wall s | x plain forward | peak CUDA MiB | GPU J | CPU J | notes |",
             "|---|---|---|---|---|---|---|",
             row("plain forward epoch (frozen, nothing kept)", r["plain"]),
             row("extraction, per-token store", r.get("extract_all"), f"{disk('all'):,.0f} MiB on disk" + busy("all")),
             row("extraction, pooled store", r.get("extract_pooled"), f"{disk('pooled'):,.1f} MiB on disk" + busy("pooled"))]
    if "extract_pooled_ft_batches" in r:  # runs before 2026-11-28 (later) had no such phase
        lines.append(row(f"extraction, pooled store, batches of <= {a.finetune_batch_tokens} padded tokens "
                         "(fine-tuning's)", r["extract_pooled_ft_batches"],
                         "for its memory; its time includes the first meeting of these batch shapes"))
    for tokens, name in (("all", "per-token"), ("pooled", "pooled")):
        for seeds in (1, S):
            lines += stage_two_rows(f"train_{tokens}_{seeds}", f"stage two, {name} store", seeds)
    if f"composite_all_{S}" in r:  # runs before the fused GRU cell kernels had no such phase
        lines += stage_two_rows(f"composite_all_{S}", "stage two, per-token store, GRU steps in torch operators (no "
                                "fused cell kernels)", S)
    if f"host_all_{S}" in r:  # runs before 2026-11-28 (third) streamed from the store alone
        lines += stage_two_rows(f"host_all_{S}", "stage two, per-token store streamed from pinned host memory "
                                "(memory_budget=0)", S)
    lines += stage_two_rows(f"streamed_all_{S}", "stage two, per-token store streamed from the store (memory_budget=0)",
                            S)
    for key, name in ((f"recorded_all_{seeds}", "stage two --cuda-graphs, per-token store") for seeds in (1, S)):
        if key in r:  # runs before 2026-11-28 (third) had no recorded graphs
            lines += stage_two_rows(key, name, int(key.rsplit("_", 1)[1]))
    for key, name in ((f"recorded_pooled_{seeds}", "stage two --cuda-graphs, pooled store") for seeds in (1, S)):
        if key in r:
            lines += stage_two_rows(key, name, int(key.rsplit("_", 1)[1]))
    for key, name in ((f"recorded_tf32_all_{S}", "stage two --cuda-graphs --tf32, per-token store"),
                      (f"recorded_streamed_all_{S}", "stage two --cuda-graphs, per-token store streamed from pinned "
                       "host memory (memory_budget=0, --shuffle-buffer 2)")):
        if key in r:
            lines += stage_two_rows(key, name, S)
    if a.compiled:
        for prefix, name in (("compiled_all", "--compile"), ("graphs_all", "--compile --cuda-graphs --tf32")):
            for seeds in (1, S):
                if f"{prefix}_{seeds}" in r or prefix == "compiled_all":
                    lines += stage_two_rows(f"{prefix}_{seeds}", f"stage two {name}, per-token store", seeds)
        if f"graphs_warm_all_{S}" in r:  # runs before 2026-11-28 (third) timed a second compile
            lines += stage_two_rows(f"graphs_warm_all_{S}", "stage two --compile --cuda-graphs --tf32 again, compile "
                                    "caches warm (a second run on this machine)", S)
        lines += stage_two_rows(f"graphs_streamed_all_{S}", "stage two --compile --cuda-graphs --tf32, streamed "
                                "(memory_budget=0, --shuffle-buffer 2)", S)
    ft_run = r.get("finetune")
    # Runs before the warm-up epoch was added timed only a first epoch ("wall"): it stands for all ten.
    ft_warm, ft_epoch = ((ft_run["warm_up"], ft_run["epoch"]) if ft_run and "epoch" in ft_run
                         else (ft_run, ft_run))
    batches_note = f"batches of <= {a.finetune_batch_tokens} padded tokens"
    if ft_run and "epoch" in ft_run:
        lines.append(row("full fine-tuning: warm-up epoch", ft_warm, "first epoch: allocator, kernels"))
    lines.append(row("full fine-tuning, one epoch", ft_epoch, batches_note))
    lines.append("")
    for tokens, name, target in (("all", "per-token", " (target >= 0.85)"), ("pooled", "pooled", "")):
        if "wall" in r.get(f"extract_{tokens}", {}):
            lines.append(f"Extraction throughput / plain forward, {name} store: "
                         f"**{plain / r[f'extract_{tokens}']['wall']:.2f}**{target}.")
    for prefix, how in (("train_all", "eager"), ("train_pooled", "eager, pooled store"),
                        ("recorded_all", "--cuda-graphs"), ("recorded_pooled", "--cuda-graphs, pooled store"),
                        ("compiled_all", "--compile"), ("graphs_all", "--compile --cuda-graphs --tf32")):
        one, many = r.get(f"{prefix}_1", {}).get("epoch"), r.get(f"{prefix}_{S}", {}).get("epoch")
        if one and many:
            lines.append(f"Stage two ({how}): a {S}-seed epoch / a plain forward epoch **{many['wall'] / plain:.2f}** "
                         f"(target <= 0.25); {S} seeds / 1 seed **{many['wall'] / one['wall']:.2f}** (target <= 1.5).")
    fused, composite = r.get(f"train_all_{S}", {}).get("epoch"), r.get(f"composite_all_{S}", {}).get("epoch")
    if fused and composite:
        lines.append(f"Eager GRU layer steps through the fused cell kernels / in torch operators, a {S}-seed epoch: "
                     f"**{fused['wall'] / composite['wall']:.2f}** ({fused['wall']:.2f} s against "
                     f"{composite['wall']:.2f} s).")
    ft = ft_epoch if ft_epoch and "wall" in ft_epoch else None
    per_token = "extract_all"
    for prefix, how, extraction in (
            ("train_all", "eager", per_token),
            ("streamed_all", "eager, streamed from the store: rows not held on the device", per_token),
            ("host_all", "eager, streamed from pinned host memory: rows not held on the device", per_token),
            ("recorded_all", "--cuda-graphs", per_token), ("recorded_tf32_all", "--cuda-graphs --tf32", per_token),
            ("recorded_streamed_all", "--cuda-graphs, streamed 2 blocks at a time from pinned host memory", per_token),
            ("compiled_all", "--compile", per_token), ("graphs_all", "--compile --cuda-graphs --tf32", per_token),
            ("graphs_warm_all", "--compile --cuda-graphs --tf32, compile caches warm", per_token),
            # streamed from the store in runs before 2026-11-28 (third), from pinned host memory since (its rows say)
            ("graphs_streamed_all", "--compile --cuda-graphs --tf32, streamed 2 blocks at a time", per_token),
            ("train_pooled", "eager, pooled store", "extract_pooled"),
            ("train_pooled", "eager, pooled store extracted in fine-tuning's batch size", "extract_pooled_ft_batches"),
            ("recorded_pooled", "--cuda-graphs, pooled store", "extract_pooled"),
            ("recorded_pooled", "--cuda-graphs, pooled store extracted in fine-tuning's batch size",
             "extract_pooled_ft_batches")):
        t = r.get(f"{prefix}_{S}", {})
        ext = r.get(extraction) or {}
        if ft and "epoch" in t and "wall" in ext:
            read = (ext["wall"] + t["read"]["wall"] + t["warm_up"]["wall"]
                    + 9 * t["epoch"]["wall"])  # the warm-up epoch is the first of the ten
            phases = (ext, t["read"], t["warm_up"], t["epoch"], t.get("evaluation", {}))
            peak = max(m.get("peak_mb") or 0 for m in phases)
            ft_peak = max(ft["peak_mb"] or 0, ft_warm["peak_mb"] or 0)
            memory = (f", peak memory **{peak / ft_peak:.0%}** of full fine-tuning's (target <= 25%)"
                      if ft_peak else "")
            full = S * (ft_warm["wall"] + 9 * ft["wall"])  # each seed's run has its own first epoch
            lines.append(f"READ from the cache ({how}), {S} seeds x 10 epochs including the extraction: {read:.0f} s "
                         f"against {full:.0f} s for full fine-tuning {S} seeds x 10 epochs, "
                         f"**{full / read:.1f}x** less wall time (target >= 20x){memory}. Both "
                         "extrapolated from the warm-up and one-epoch figures above.")
    buffered = (f"; {r['buffered_mib_s']:,.0f} MiB/s into the page cache, not fsync'd, as a store's writes go"
                if "buffered_mib_s" in r else "")
    lines += ["", f"Disk: sequential write {r['disk_mib_s']:,.0f} MiB/s fsync'd, in the work folder{buffered}."
              + (f" The per-token store took {disk('all'):,.0f} MiB on disk; written at the plain forward's pace "
                 f"that is {disk('all') / plain:,.0f} MiB/s: a sustained extraction (a store larger than the page "
                 f"cache takes) is bounded by the disk at "
                 f"{min(1.0, r['disk_mib_s'] * plain / disk('all')):.2f} of the plain forward." if "wall" in ext_all
                 else ""),
              "", f"Command: `{command}`", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="rte")
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"), help="glue_data folder [$GLUE_DIR]")
    p.add_argument("--shape", default="t5-base", help="a shape of pipeline.extraction.shapes")
    p.add_argument("--tokenizer", default=None, help="copy this folder's tokenizer instead of training one")
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each split")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--writers", type=int, default=min(8, os.cpu_count() or 1), help="extraction writer threads")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--rnn-dim", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--finetune-batch-tokens", type=int, default=4096)
    p.add_argument("--disk-probe-mib", type=int, default=1024, help="MiB written to measure the disk's bandwidth")
    p.add_argument("--work", default=None, help="folder for the model and stores [a new temporary folder]")
    p.add_argument("--benchmarks", default=str(REPO / "BENCHMARKS.md"), help="file whose '## GPU' section is rewritten")
    p.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                   help="also time stage two with --cuda-graphs and --compile (per-token store, 1 and --seeds seeds), "
                        "last")
    p.add_argument("--results", default=None, help="JSON file rewritten after every phase (a cut run keeps its figures)")
    p.add_argument("--stacks-after", type=float, default=None, metavar="SECONDS",
                   help="print every thread's stack to stderr after this many seconds (set it just under an outer "
                        "`timeout`, so a run that hangs says where)")
    p.add_argument("--render", default=None, metavar="RESULTS_JSON",
                   help="run nothing: rewrite the section from a --results file of an earlier run")
    args = p.parse_args(argv)
    args.command = "python benchmarks/gpu.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = json.loads(Path(args.render).read_text()) if args.render else run(args)
    text = render(result, result["command"])
    print(text)
    write_section(SECTION, text, Path(args.benchmarks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
