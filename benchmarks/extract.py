"""Stage one's cost: extraction throughput against a plain frozen forward, and bytes on disk.

Run from the repository root:

    .venv/bin/python benchmarks/extract.py --model all-MiniLM-L6-v2 --task rte --limit 600

What it measures, in one process and on the same length-sorted batches:

1. Throughput (tokens/s) of the real pipeline, ``Extraction(cfg).run()`` writing a real Zarr store
   (bfloat16, every token, default block/shard layout) into a temporary folder, against a plain frozen
   forward of the same model object (``torch.inference_mode``, ``output_hidden_states=False``, nothing
   kept) over exactly the batches the pipeline forms (same blocks, same ``length_batches``). The two are
   interleaved in ABBA order over several rounds (plain, extract / extract, plain / ...) and the ratio is
   taken per round, next to its neighbour, then the median: the machines here are shared, so absolute
   times drift. Wall clock and process CPU time (all threads) are both reported.
   A breakdown says where the extraction's time goes: the model's own forward, the gather/convert/copy
   of hidden states into the block (inside the forward: each state as it is made), the rest of the batch loop,
   tokenization, waiting on the writer thread, and how busy the writer
   thread itself was (overlapped with the forward).
2. Bytes on disk per token per layer, against the raw 2*d bytes of bfloat16, for each codec
   (every choice of ``--codec``; the timed runs write the default) on the real activations; the number of files in each store; and the pooled
   store (``tokens="pooled"``) for comparison.
3. A markdown table, printed, and written into BENCHMARKS.md under "## Extraction (stage one)" (other
   sections of that file are left as they are).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np
import torch

from pipeline.common.config import ExtractConfig
from pipeline.common.settings import field_of
from pipeline.extraction import Extraction, length_batches
from pipeline.extraction import stage as extraction_stage
from pipeline.extraction.backbones import Backbone, load_backbone
from pipeline.store import CacheStore, plan_blocks

SECTION = "## Extraction (stage one)"
CODEC = field_of(ExtractConfig, "codec")
TIMED_CODEC, CODECS = CODEC.default, CODEC.metadata["setting"].choices  # the timed runs write the pipeline's default codec


# ---- timing helpers ------------------------------------------------------------------------------


class Clock:
    """Accumulated wall and thread-CPU seconds per label (thread-safe: the writer runs on its own thread)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.lock = threading.Lock()

    def wrap(self, label: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                dw, dc = time.perf_counter() - w0, time.thread_time() - c0
                with self.lock:
                    self.wall[label] = self.wall.get(label, 0.0) + dw
                    self.cpu[label] = self.cpu.get(label, 0.0) + dc

        return timed


def instrument_model(backbone: Backbone, clock: Clock) -> Callable[[], None]:
    """Time the model's own forward (nn.Module calls self.forward); returns an undo function."""
    model = backbone.model
    model.forward = clock.wrap("model", type(model).forward.__get__(model))

    def undo() -> None:
        del model.forward

    return undo


# ---- the two contenders ----------------------------------------------------------------------------


def planned_batches(ext: Extraction, split: str) -> tuple[list[list[list[int]]], int, int]:
    """The exact batches Extraction.run_split forms: blocks by plan_blocks, then length_batches inside."""
    bb, cfg = ext.backbone, ext.cfg
    token_ids = bb.tokenize(ext.task, ext.data[split].texts, cfg.max_length)
    n_tokens = np.array([len(t) for t in token_ids], dtype=np.int64)
    rows = {side: (n_tokens if ext.per_token[side] else np.ones_like(n_tokens)) for side in ext.layers}
    plan = plan_blocks(rows, ext.limits, ext.chunk_rows)
    batches = []
    for j in range(plan.num_blocks):
        lo, hi = int(plan.block_starts[j]), int(plan.block_starts[j + 1])
        block = token_ids[lo:hi]
        for batch in length_batches([len(t) for t in block], cfg.batch_tokens):
            batches.append([block[i] for i in batch])
    return batches, int(n_tokens.sum()), plan.num_blocks


@torch.inference_mode()
def plain_forward(backbone: Backbone, batches: list[list[list[int]]]) -> None:
    """The floor: the frozen model over the same padded batches, nothing kept, no hidden states."""
    model, device = backbone.model, backbone.device
    pad_id = backbone.tokenizer.pad_token_id or 0
    # The same precision as Backbone.forward: bf16 autocast on CUDA, float32 on CPU.
    autocast = torch.autocast(device.type, dtype=backbone.autocast_dtype or torch.bfloat16,
                              enabled=backbone.autocast_dtype is not None)
    for batch in batches:
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        with autocast:
            if backbone.family == "seq2seq":
                start = torch.full((len(batch), 1), model.config.decoder_start_token_id, device=device)
                model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=start, output_hidden_states=False)
            elif backbone.family == "decoder":
                model.base_model(input_ids=input_ids, attention_mask=mask, output_hidden_states=False)
            else:
                model(input_ids=input_ids, attention_mask=mask, output_hidden_states=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_config(args: argparse.Namespace, out: Path, **overrides: Any) -> ExtractConfig:
    values = dict(
        model=args.model, task=args.task, out=str(out), glue_dir=args.glue_dir, splits=args.split,
        max_length=args.max_length, batch_tokens=args.batch_tokens, dtype="bfloat16", device=args.device,
        tokens="all", limit=args.limit, block_tokens=args.block_tokens, codec=TIMED_CODEC, overwrite=True,
    )
    values.update(overrides)
    return ExtractConfig(**values)


def run_extraction(cfg: ExtractConfig, backbone: Backbone) -> tuple[Extraction, dict[str, Any]]:
    """One real extraction into cfg.out (the already-loaded backbone is reused: load time is not counted)."""
    ext = Extraction(cfg, progress=False, backbone=backbone)
    clock = Clock()
    undo = instrument_model(backbone, clock)
    bb_tokenize = backbone.tokenize
    backbone.tokenize = clock.wrap("tokenize", bb_tokenize)  # type: ignore[method-assign]
    ext._compute_block = clock.wrap("compute_block", ext._compute_block)  # type: ignore[method-assign]
    ext.writer.write_block = clock.wrap("writer", ext.writer.write_block)  # type: ignore[method-assign]
    sink = extraction_stage.StateSink.__call__  # called for each state as the forward makes it (inside "model")
    extraction_stage.StateSink.__call__ = clock.wrap("gather", sink)  # type: ignore[method-assign]
    try:
        w0, c0 = time.perf_counter(), time.process_time()
        ext.run()
        if backbone.device.type == "cuda":
            torch.cuda.synchronize(backbone.device)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        undo()
        del backbone.tokenize
        extraction_stage.StateSink.__call__ = sink  # type: ignore[method-assign]
    return ext, {"wall": wall, "cpu": cpu, "clock": clock}


def timed_plain(backbone: Backbone, batches: list[list[list[int]]]) -> dict[str, Any]:
    clock = Clock()
    undo = instrument_model(backbone, clock)
    try:
        w0, c0 = time.perf_counter(), time.process_time()
        plain_forward(backbone, batches)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        undo()
    return {"wall": wall, "cpu": cpu, "clock": clock}


# ---- store sizes ---------------------------------------------------------------------------------


def store_files(path: Path) -> list[Path]:
    return [f for f in path.rglob("*") if f.is_file()]


def size_row(label: str, path: Path, tokens: int, layers: int, d_model: int) -> dict[str, Any]:
    files = store_files(path)
    # Files that come one per block: the hidden-state and token-id shards, and the block's done flag.
    per_block = sum(
        1 for f in files
        if {"hidden", "token_ids", "blocks_done"} & set(f.relative_to(path).parts) and f.name != "zarr.json"
    )
    total = sum(f.stat().st_size for f in files)
    hidden = sum(f.stat().st_size for f in files if "hidden" in f.relative_to(path).parts)
    return {
        "label": label, "files": len(files), "per_block_files": per_block, "bytes": total, "hidden_bytes": hidden,
        "per_token_layer": total / (tokens * layers), "hidden_per_token_layer": hidden / (tokens * layers),
        "raw": 2 * d_model,
    }


# ---- report ---------------------------------------------------------------------------------------


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def render(result: dict[str, Any]) -> str:
    r = result
    lines = [
        SECTION,
        "",
        f"Measured {r['date']} on {r['machine']}; load average (1 min) {r['load'][0]:.1f} before the timed "
        f"rounds and {r['load'][1]:.1f} after them.",
        "",
        "Command (from the repository root):",
        "",
        "    " + r["command"],
        "",
        f"Backbone `{r['model']}` ({r['family']}, d={r['d_model']}, {r['layers']} stored states per token), "
        f"task `{r['task']}` split `{r['split']}`: {r['examples']:,} examples, {r['tokens']:,} tokens "
        f"(max_length {r['max_length']}, batch_tokens {r['batch_tokens']}, {r['num_batches']} batches in "
        f"{r['num_blocks']} block(s)); torch {torch.__version__} with {r['threads']} intra-op threads.",
        "",
        "### Throughput: extraction against a plain frozen forward (same batches)",
        "",
        f"{r['rounds']} rounds in ABBA order (plain/extract, extract/plain, ...); each round's ratio compares "
        "two neighbouring runs; the table gives the median over rounds. Wall = elapsed time; CPU = process "
        "CPU time over all threads (less sensitive to other jobs on the shared cores).",
        "",
        "| run | tokens/s (wall, median) | wall s per run | CPU s per run |",
        "|---|---:|---|---|",
        f"| plain forward (inference_mode, no hidden states, nothing stored) | {fmt(r['plain_tps'])} | "
        f"{', '.join(fmt(x, 2) for x in r['plain_wall'])} | {', '.join(fmt(x, 2) for x in r['plain_cpu'])} |",
        f"| extraction (`Extraction.run()`, bf16 per-token Zarr store, {TIMED_CODEC}) | {fmt(r['extract_tps'])} | "
        f"{', '.join(fmt(x, 2) for x in r['extract_wall'])} | {', '.join(fmt(x, 2) for x in r['extract_cpu'])} |",
        "",
        f"**Ratio extraction/plain (wall, median of per-round ratios): {r['ratio_wall']:.3f}** "
        f"(per round: {', '.join(f'{x:.3f}' for x in r['ratios_wall'])}; ratio of medians "
        f"{r['ratio_of_medians']:.3f}). CPU-time ratio plain/extraction: {r['ratio_cpu']:.3f} "
        f"(per round: {', '.join(f'{x:.3f}' for x in r['ratios_cpu'])}). Target: >= 0.85.",
        "",
        "Where the extraction's wall time goes (median over its runs; the writer thread runs alongside):",
        "",
        "| part | wall s | share of the run |",
        "|---|---:|---:|",
    ]
    total = r["breakdown"]["total"]
    for key, name in [
        ("model", "model forward (the same compute as the plain run)"),
        ("gather", "gather/convert to bf16/copy into the block, each state as the forward makes it"),
        ("loop", "rest of the batch loop (token ids, the label rows' check)"),
        ("tokenize", "tokenization"),
        ("wait", "waiting on the writer + store bookkeeping (run minus the above)"),
    ]:
        v = r["breakdown"][key]
        lines.append(f"| {name} | {v:.2f} | {100 * v / total:.1f}% |")
    lines += [
        f"| **whole run** | {total:.2f} | 100% |",
        f"| writer busy: `write_block` wall time on the writer threads ({TIMED_CODEC} + shard files), "
        f"overlapped with the forward | {r['breakdown']['writer']:.2f} | |",
        f"| plain run, for reference: model forward | {r['breakdown']['plain_model']:.2f} of "
        f"{r['breakdown']['plain_total']:.2f} | |",
        "",
        "### Bytes on disk (real activations)",
        "",
        f"Raw bfloat16 is 2 x d = {r['raw']} bytes per token per layer. 'per token x layer' divides the "
        "store's whole on-disk size (every file: hidden states, token ids, offsets, labels, metadata) by "
        "tokens x stored layers; 'hidden only' counts only the hidden-state shards. Codec 'none' lands a "
        "little above 2d: the zero tail of each block's last inner chunk and the shard index are stored too. "
        "The pooled store keeps one row per example: its bytes are divided by the same token count (so the "
        "figure compares directly with the per-token stores), and per example x layer in brackets. "
        "'writer busy' is the wall time of `write_block` on the writer threads (compression + files), "
        f"overlapped with the forward; the {TIMED_CODEC} row is the median of the timed runs, the others one run each "
        "(noisy on shared cores).",
        "",
        "| store | codec | files (per block / other) | MiB on disk | bytes per token x layer | hidden only | raw 2d / hidden only | writer busy s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in r["sizes"]:
        files = f"{s['files']} ({s['per_block_files']} in {s['blocks']} block(s) / {s['files'] - s['per_block_files']})"
        if s["tokens"] == "all":
            per = f"{s['per_token_layer']:.1f}"
            hidden = f"{s['hidden_per_token_layer']:.1f}"
        else:
            per = f"{s['per_token_layer']:.2f} ({s['per_example_layer']:.1f} per example x layer)"
            hidden = f"{s['hidden_per_token_layer']:.2f}"
        lines.append(
            f"| {'per-token' if s['tokens'] == 'all' else 'pooled'} | {s['codec']} | {files} | "
            f"{s['bytes'] / 2**20:,.2f} | {per} | {hidden} | {r['raw'] / s['hidden_per_token_layer']:.3f} | "
            f"{s['writer']:.2f} |"
        )
    timed = next((s for s in r["sizes"] if s["codec"] == TIMED_CODEC and s["tokens"] == "all"), None)
    pooled = next((s for s in r["sizes"] if s["tokens"] == "pooled"), None)
    if timed and pooled:
        lines += ["", f"The pooled store is {timed['bytes'] / pooled['bytes']:.1f}x smaller than the per-token "
                  f"{TIMED_CODEC} store "
                  f"({r['tokens'] / r['examples']:.1f} tokens per example on average here)."]
    lines += [""]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace (or append) our section, leaving every other section of the file as it is."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = text.rstrip("\n") + "\n\n"
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new.rstrip("\n") + "\n")


def machine() -> str:
    cores = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cores} CPU cores ({cpu}), {gpu}, shared with other jobs"


# ---- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_glue = os.environ.get("GLUE_DIR") or str(REPO / ".." / "shared" / "data" / "glue")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2", help="backbone name or folder (default: %(default)s)")
    p.add_argument("--task", default="rte", help="GLUE task (default: %(default)s)")
    p.add_argument("--split", default="train", help="split to extract (default: %(default)s)")
    p.add_argument("--glue-dir", default=default_glue, help="glue_data folder (default: $GLUE_DIR or ../shared/data/glue)")
    p.add_argument("--limit", type=int, default=None, help="first N examples of the split (default: all)")
    p.add_argument("--rounds", type=int, default=4, help="plain/extract rounds, ABBA order (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=field_of(ExtractConfig, "max_length").default)
    p.add_argument("--batch-tokens", type=int, default=field_of(ExtractConfig, "batch_tokens").default)
    p.add_argument("--block-tokens", type=int, default=None, help="rows per block/shard (default: the pipeline's)")
    p.add_argument("--device", default=field_of(ExtractConfig, "device").default)
    p.add_argument("--codecs", default=",".join(CODECS), help="codecs to size (default: %(default)s)")
    p.add_argument("--no-pooled", action="store_true", help="skip the pooled store")
    p.add_argument("--workdir", default=None, help="where the temporary stores go (default: system temp)")
    p.add_argument("--output", default=str(REPO / "BENCHMARKS.md"), help="markdown file to update (default: %(default)s)")
    p.add_argument("--no-write", action="store_true", help="print the table only; leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = ".venv/bin/python benchmarks/extract.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    print(f"loading {args.model} ...", file=sys.stderr)
    backbone = load_backbone(args.model, dtype="bfloat16", device=args.device)

    with tempfile.TemporaryDirectory(prefix="bench-extract-", dir=args.workdir) as tmp:
        tmp_path = Path(tmp)
        # A first extraction (not timed for the ratio) builds the batches and warms up allocator and threads.
        # It also records the batches the pipeline forms, to check that the plain run gets the same ones.
        recorded: list[list[int]] = []
        fwd = backbone.forward
        backbone.forward = lambda ids, *rest: (recorded.append([len(x) for x in ids]), fwd(ids, *rest))[1]  # type: ignore[method-assign]
        try:
            ext, _ = run_extraction(make_config(args, tmp_path / "warm.zarr"), backbone)
        finally:
            del backbone.forward
        shutil.rmtree(tmp_path / "warm.zarr")
        batches, tokens, num_blocks = planned_batches(ext, args.split)
        if recorded != [[len(x) for x in b] for b in batches]:
            raise SystemExit("the benchmark's batches differ from the pipeline's: fix planned_batches()")
        layers = len(ext.layers["encoder"]) if "encoder" in ext.layers else len(next(iter(ext.layers.values())))
        examples = len(ext.data[args.split])
        print(f"{examples} examples, {tokens} tokens, {len(batches)} batches", file=sys.stderr)

        plain_runs, extract_runs, ratios_wall, ratios_cpu = [], [], [], []
        load_before = os.getloadavg()[0]
        for r in range(args.rounds):
            order = ("plain", "extract") if r % 2 == 0 else ("extract", "plain")
            got: dict[str, dict[str, Any]] = {}
            for which in order:
                if which == "plain":
                    got[which] = timed_plain(backbone, batches)
                else:
                    _, got[which] = run_extraction(make_config(args, tmp_path / f"run{r}.zarr"), backbone)
            if r > 0:
                shutil.rmtree(tmp_path / f"run{r}.zarr")  # run0 is kept for the size table
            plain_runs.append(got["plain"])
            extract_runs.append(got["extract"])
            ratios_wall.append(got["plain"]["wall"] / got["extract"]["wall"])
            ratios_cpu.append(got["plain"]["cpu"] / got["extract"]["cpu"])
            print(f"round {r}: plain {got['plain']['wall']:.2f}s extract {got['extract']['wall']:.2f}s "
                  f"ratio {ratios_wall[-1]:.3f} (cpu {ratios_cpu[-1]:.3f})", file=sys.stderr)

        load_after = os.getloadavg()[0]
        med = statistics.median
        plain_wall = [x["wall"] for x in plain_runs]
        extract_wall = [x["wall"] for x in extract_runs]

        def part(runs: list[dict[str, Any]], label: str, kind: str = "wall") -> float:
            return med([getattr(x["clock"], kind).get(label, 0.0) for x in runs])

        total = med(extract_wall)
        model = part(extract_runs, "model")  # the forward, with each state's gather inside it
        gather = part(extract_runs, "gather")
        compute = part(extract_runs, "compute_block")
        tok = part(extract_runs, "tokenize")
        breakdown = {
            "total": total, "model": model - gather, "gather": gather, "loop": compute - model, "tokenize": tok,
            "wait": total - compute - tok, "writer": part(extract_runs, "writer"),
            "plain_model": part(plain_runs, "model"), "plain_total": med(plain_wall),
        }

        # Sizes: the default codec's stores from the timed runs, then one extraction per other codec, and pooled.
        sizes = []
        codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
        for codec in codecs:
            if codec == TIMED_CODEC:
                path, writer = tmp_path / "run0.zarr", breakdown["writer"]
            else:
                path = tmp_path / f"codec-{codec}.zarr"
                _, info = run_extraction(make_config(args, path, codec=codec), backbone)
                writer = info["clock"].wall.get("writer", 0.0)
            store = CacheStore(path)
            store.require_complete([args.split])
            sizes.append({**size_row(codec, path, tokens, layers, backbone.d_model), "codec": codec, "tokens": "all",
                          "writer": writer, "blocks": store.split(args.split).num_blocks})
        if not args.no_pooled:
            path = tmp_path / "pooled.zarr"
            _, info = run_extraction(make_config(args, path, tokens="pooled"), backbone)
            store = CacheStore(path)
            store.require_complete([args.split])
            row = size_row("pooled", path, tokens, layers, backbone.d_model)
            row["per_example_layer"] = row["bytes"] / (examples * layers)
            sizes.append({**row, "codec": TIMED_CODEC, "tokens": "pooled", "writer": info["clock"].wall.get("writer", 0.0),
                          "blocks": store.split(args.split).num_blocks})

    result = {
        "date": _dt.date.today().isoformat(), "machine": machine(), "command": command,
        "model": args.model, "family": backbone.family, "d_model": backbone.d_model, "layers": layers,
        "task": args.task, "split": args.split, "examples": examples, "tokens": tokens,
        "max_length": args.max_length, "batch_tokens": args.batch_tokens, "num_batches": len(batches),
        "num_blocks": num_blocks,
        "threads": torch.get_num_threads(), "rounds": args.rounds, "load": (load_before, load_after),
        "plain_wall": plain_wall, "plain_cpu": [x["cpu"] for x in plain_runs],
        "extract_wall": extract_wall, "extract_cpu": [x["cpu"] for x in extract_runs],
        "plain_tps": tokens / med(plain_wall), "extract_tps": tokens / med(extract_wall),
        "ratios_wall": ratios_wall, "ratios_cpu": ratios_cpu, "ratio_wall": med(ratios_wall),
        "ratio_cpu": med(ratios_cpu), "ratio_of_medians": med(plain_wall) / med(extract_wall),
        "breakdown": breakdown, "sizes": sizes, "raw": 2 * backbone.d_model,
    }
    text = render(result)
    print(text)
    if not args.no_write:
        write_section(Path(args.output), text)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
