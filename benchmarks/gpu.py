"""Both stages on one accelerator, side by side on the same tokens, in one process.

Run from the repository root (about 5 minutes on one H100/H200 with the t5-base shape on RTE):

    .venv/bin/python benchmarks/gpu.py --task rte --glue-dir /path/to/glue_data

It builds a randomly initialised model of ``--shape`` (default t5-base, via ``pipeline.extraction.shapes``;
its tokenizer is trained on GLUE text from ``--glue-dir`` or copied from ``--tokenizer``), loads it once,
and measures on the task's train split (``--limit`` examples, default all):

1. a plain forward epoch: the frozen model over the extraction's own batches, nothing kept;
2. extraction of the train split into a per-token and a pooled store (``Extraction.run_split``, the
   loaded model reused through ``Extraction(cfg, backbone=...)``);
3. stage two for 1 and ``--seeds`` seeds on each store: reading the store (``Trainer`` construction)
   and one epoch (``Trainer.train_epoch``, timed after one warm-up epoch);
4. one epoch of full fine-tuning of the same model (every weight trained, AdamW, bf16 autocast on CUDA).

For each: wall seconds, peak CUDA memory and energy (NVML when ``pynvml`` is installed; RAPL for the
CPU when readable) via ``pipeline.common.resources.ResourceMeter``. The "## GPU" section of
``--benchmarks`` (default BENCHMARKS.md) is rewritten with the card's name and the command. With
``--shape t5-tiny --device cpu --limit 64`` the whole run takes seconds on a CPU (the test runs it so).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from extract import machine, plain_forward, planned_batches  # noqa: E402
from quality import write_section  # noqa: E402

from pipeline.common.config import ExtractConfig, TrainConfig  # noqa: E402
from pipeline.common.resources import ResourceMeter, pick_device  # noqa: E402
from pipeline.extraction import Extraction  # noqa: E402
from pipeline.extraction.backbones import Backbone, load_backbone  # noqa: E402
from pipeline.extraction.shapes import build_random_backbone  # noqa: E402
from pipeline.extraction.stage import gather_splits  # noqa: E402
from pipeline.training import Trainer  # noqa: E402
from pipeline.training.trainer import lr_lambda  # noqa: E402

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


def disk_write_mib_s(folder: Path, mib: int = 1024) -> float:
    """Sequential write bandwidth of ``folder``'s disk (random bytes, fsync'd): what a store's writes can reach."""
    block = np.random.default_rng(0).integers(0, 256, 64 * 2**20, dtype=np.uint8).tobytes()
    path = folder / "disk-probe.bin"
    started = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(max(1, mib // 64)):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return max(1, mib // 64) * 64 / seconds


def extraction_config(args: argparse.Namespace, model: Path, out: Path, tokens: str) -> ExtractConfig:
    return ExtractConfig(model=str(model), task=args.task, out=str(out), glue_dir=args.glue_dir,
                         splits=("train", "validation"), max_length=args.max_length, batch_tokens=args.batch_tokens,
                         dtype="bfloat16", device=args.device, tokens=tokens, limit=args.limit, overwrite=True,
                         writers=args.writers)


def stage_two(args: argparse.Namespace, cache: Path, seeds: int, device: torch.device) -> dict[str, Any]:
    """Reading the store, then one timed epoch after a warm-up epoch (allocator, kernels)."""
    cfg = TrainConfig(cache=str(cache), out=str(cache.parent / f"run-{cache.stem}-{seeds}"), seeds=tuple(range(seeds)),
                      epochs=2, device=args.device, patience=None, rnn_dim=args.rnn_dim, batch_size=args.batch_size)
    read, trainer = measured(device, lambda: Trainer(cfg, progress=False))
    steps = 2 * math.ceil(len(trainer.train_data) / cfg.batch_size)
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, cfg.warmup_ratio))
    trainer.train_epoch(1, optimizer, scheduler)
    epoch, _ = measured(device, lambda: trainer.train_epoch(2, optimizer, scheduler))
    return {"read": read, "epoch": epoch, "in_memory": trainer.train_data.in_memory,
            "on_device": str(trainer.train_data.device)}


def finetune_epoch(backbone: Backbone, model_path: Path, batches: list[list[list[int]]], labels: list[int],
                   device: torch.device) -> None:
    """One epoch of full fine-tuning: the seq2seq model learns to emit the label word (encoders: a mean-pool head)."""
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


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = pick_device(args.device)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-bench-"))
    started = time.perf_counter()
    model_path = build_random_backbone(args.shape, work / "model", glue_dir=args.glue_dir, tokenizer=args.tokenizer)
    backbone = load_backbone(str(model_path), dtype="bfloat16", device=args.device)
    data = gather_splits(extraction_config(args, model_path, work / "x.zarr", "all"), _task(args.task))
    result: dict[str, Any] = {"device": str(device), "examples": len(data["train"]),
                              "disk_mib_s": disk_write_mib_s(work, args.disk_probe_mib)}
    extractions = {}
    for tokens in ("all", "pooled"):
        ext = Extraction(extraction_config(args, model_path, work / f"{tokens}.zarr", tokens), progress=False,
                         data=data, backbone=backbone)
        if tokens == "all":
            batches, result["tokens"], result["blocks"] = planned_batches(ext, "train")
            plain_forward(backbone, batches[:2])  # warm-up: kernels, allocator
            result["plain"], _ = measured(device, lambda: plain_forward(backbone, batches))
        result[f"extract_{tokens}"], _ = measured(device, lambda: ext.run_split("train"))
        ext.run_split("validation")
        extractions[tokens] = Path(ext.cfg.out_path)
        result[f"disk_{tokens}"] = sum(f.stat().st_size for f in extractions[tokens].rglob("*") if f.is_file())
    for tokens, cache in extractions.items():
        for seeds in (1, args.seeds):
            result[f"train_{tokens}_{seeds}"] = stage_two(args, cache, seeds, device)
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
    result["finetune"], _ = measured(device, lambda: finetune_epoch(backbone, model_path, ft_batches, ft_labels, device))
    result["total_s"] = time.perf_counter() - started
    return result


def _task(name: str):
    from pipeline.common.tasks import get_task

    return get_task(name)


def render(args: argparse.Namespace, r: dict[str, Any], command: str) -> str:
    card = torch.cuda.get_device_name(torch.device(r["device"])) if r["device"].startswith("cuda") else "no GPU (CPU run)"
    plain = r["plain"]["wall"]
    S = args.seeds

    def row(label: str, m: dict[str, Any], note: str = "") -> str:
        def cell(v: Any, digits: int = 1) -> str:
            return "n/a" if v is None else f"{v:,.{digits}f}"
        return (f"| {label} | {m['wall']:.2f} | {m['wall'] / plain:.2f} | {cell(m['peak_mb'], 0)} | "
                f"{cell(m['gpu_j'])} | {cell(m['cpu_j'])} | {note} |")

    lines = [SECTION, "",
             f"Card: **{card}**; {machine()}; torch {torch.__version__}; {_dt.date.today().isoformat()}. Model: random "
             f"`{args.shape}` shape (bf16 autocast on CUDA), task {args.task} train: {r['examples']:,} examples, "
             f"{r['tokens']:,} tokens, {r['blocks']} block(s); max_length {args.max_length}, batch_tokens "
             f"{args.batch_tokens}, {args.writers} writer threads. Stage two: GRU r={args.rnn_dim}, batch "
             f"{args.batch_size}, one epoch timed after a warm-up epoch. Energy: NVML (GPU) and RAPL (CPU) where "
             f"readable, else n/a. Whole run {r['total_s']:.0f} s.", "",
             "| phase (same tokens) | wall s | x plain forward | peak CUDA MiB | GPU J | CPU J | notes |",
             "|---|---|---|---|---|---|---|",
             row("plain forward epoch (frozen, nothing kept)", r["plain"]),
             row("extraction, per-token store", r["extract_all"], f"{r['disk_all'] / 2**20:,.0f} MiB on disk"),
             row("extraction, pooled store", r["extract_pooled"], f"{r['disk_pooled'] / 2**20:,.1f} MiB on disk")]
    for tokens in ("all", "pooled"):
        for seeds in (1, S):
            t = r[f"train_{tokens}_{seeds}"]
            where = f"rows on {t['on_device']}" if t["in_memory"] else "streamed"
            name = "per-token" if tokens == "all" else "pooled"
            lines.append(row(f"stage two, {name} store: reading it, {seeds} seed(s)", t["read"]))
            lines.append(row(f"stage two, {name} store: one epoch, {seeds} seed(s)", t["epoch"], where))
    lines.append(row("full fine-tuning, one epoch", r["finetune"], f"batches of <= {args.finetune_batch_tokens} "
                     "padded tokens"))
    ext, t1, tS = r["extract_all"]["wall"], r["train_all_1"]["epoch"]["wall"], r[f"train_all_{S}"]["epoch"]["wall"]
    lines += ["",
              f"Ratios (per-token store): extraction throughput / plain forward **{plain / ext:.2f}** (target >= 0.85); "
              f"stage-two epoch with {S} seeds / plain forward epoch **{tS / plain:.2f}** (target <= 0.25); "
              f"{S} seeds / 1 seed **{tS / t1:.2f}** (target <= 1.5). Pooled store: {S} seeds / plain "
              f"{r[f'train_pooled_{S}']['epoch']['wall'] / plain:.2f}, {S}/1 "
              f"{r[f'train_pooled_{S}']['epoch']['wall'] / r['train_pooled_1']['epoch']['wall']:.2f}.",
              "",
              f"Disk: sequential write {r['disk_mib_s']:,.0f} MiB/s (fsync'd, in the work folder). The per-token store "
              f"took {r['disk_all'] / 2**20:,.0f} MiB on disk; written at the plain forward's pace that is "
              f"{r['disk_all'] / 2**20 / plain:,.0f} MiB/s, so the disk alone bounds extraction/plain at "
              f"{min(1.0, r['disk_mib_s'] * plain / (r['disk_all'] / 2**20)):.2f} here.",
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    command = "python benchmarks/gpu.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = render(args, result, command)
    print(text)
    write_section(SECTION, text, Path(args.benchmarks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
