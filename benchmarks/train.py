"""Stage two's cost: one training epoch from the store for 1 seed against 5 seeds in lockstep.

Run from the repository root, on a per-token store of RTE's first 300 training examples:

    GLUE_DIR=../shared/data/glue .venv/bin/pipeline extract --model all-MiniLM-L6-v2 --task rte --limit 300 \
        --tokens all --splits train,validation --out bench_out/stores/rte-train300-all.zarr
    .venv/bin/python benchmarks/train.py [--cache bench_out/stores/rte-train300-all.zarr] [--reps 3]

For each data mode -- held in memory (default budget) and streamed block by block (memory_budget=0,
background prefetch) -- and for S = 1 and S = 5 seeds (0..S-1), a ``Trainer`` is built once and its
real ``train_epoch`` is timed, the two S interleaved in ABBA order over ``--reps`` rounds (the
machine is shared, so the ratio is taken per round and then the median).
Reported per mode: median epoch seconds for each S, the median per-round ratio t(5)/t(1) (target
<= 2.5), and the share of the epoch spent reading the store (``Trainer.train_data.read_seconds``:
zarr reads + decode + bf16 view; in memory it is paid once, before the first epoch, and shown
separately; streamed it is paid every epoch in a prefetch thread, overlapped with compute).

Then, per S, an eager ``Trainer`` against one with ``--compile`` (torch.compile of the training step),
interleaved the same way over ``--compile-reps`` rounds; the compiled warm-up epoch pays the whole
compile (the compile cache starts empty) and is reported apart.

A breakdown of one more epoch per S (``Trainer.train_epoch`` itself, timed through its ``phase`` hook) says where
the time goes: batch assembly (gather + widen to float32), forward + loss, backward, clip + AdamW.

Only the "## Training throughput (stage two)" section of BENCHMARKS.md is rewritten.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch

from pipeline.common.config import TrainConfig
from pipeline.training.trainer import Trainer

SECTION = "## Training throughput (stage two)"
MODES = {"memory": "8GB", "streamed": 0}  # data mode -> memory_budget


def make(cache: str, seeds: int, budget: str | int, args: argparse.Namespace, compiled: bool = False):
    cfg = TrainConfig(cache=cache, out=str(REPO / "runs" / "bench_train"), seeds=tuple(range(seeds)), epochs=1,
                      rnn_dim=args.rnn_dim, batch_size=args.batch_size, device="cpu", memory_budget=budget,
                      patience=None, compile=compiled)
    trainer = Trainer(cfg, progress=False)
    opt, sched = trainer.optimizer(epochs=100)  # a schedule long enough that the lr stays near its peak
    return trainer, opt, sched


def timed_epoch(trainer, opt, sched, epoch: int) -> tuple[float, float, float]:
    """(wall s, process CPU s over all threads, read s) of one real Trainer.train_epoch."""
    read0 = trainer.train_data.read_seconds
    started, cpu0 = time.perf_counter(), time.process_time()
    trainer.train_epoch(epoch, opt, sched)
    return time.perf_counter() - started, time.process_time() - cpu0, trainer.train_data.read_seconds - read0


def breakdown(trainer, opt, sched, epoch: int) -> dict[str, float]:
    """One real Trainer.train_epoch, its CPU seconds split by the phase each step was in."""
    t = {"batch": 0.0, "forward": 0.0, "backward": 0.0, "step": 0.0}
    clock = time.process_time  # CPU seconds: robust to other jobs on the shared cores
    last = clock()

    def phase(name: str) -> None:
        nonlocal last
        now = clock()
        t[name] += now - last
        last = now

    trainer.train_epoch(epoch, opt, sched, phase=phase)
    return t


def run_mode(cache: str, budget, args, with_breakdown: bool = True) -> dict:
    made = {s: make(cache, s, budget, args) for s in (1, args.seeds)}
    first_read = {}
    # Warm-up epoch (first-touch allocations).
    for s, (tr, opt, sched) in made.items():
        loaded = tr.train_data.read_seconds  # in memory: read while the Trainer was built
        wall, cpu, read = timed_epoch(tr, opt, sched, 0)
        first_read[s] = (wall, loaded + read)
    times = {1: [], args.seeds: []}
    cpus = {1: [], args.seeds: []}
    reads = {1: [], args.seeds: []}
    ratios, cpu_ratios = [], []
    for rep in range(args.reps):
        order = (1, args.seeds) if rep % 2 == 0 else (args.seeds, 1)
        got, gotc = {}, {}
        for s in order:
            tr, opt, sched = made[s]
            wall, cpu, read = timed_epoch(tr, opt, sched, rep + 1)
            got[s], gotc[s] = wall, cpu
            times[s].append(wall)
            cpus[s].append(cpu)
            reads[s].append(read)
        ratios.append(got[args.seeds] / got[1])
        cpu_ratios.append(gotc[args.seeds] / gotc[1])
        print(f"  rep {rep}: wall t1 {got[1]:.2f}s t{args.seeds} {got[args.seeds]:.2f}s ratio {ratios[-1]:.2f}; "
              f"cpu {gotc[1]:.2f}s {gotc[args.seeds]:.2f}s ratio {cpu_ratios[-1]:.2f}", flush=True)
    parts = {s: breakdown(*made[s], epoch=99) for s in made} if with_breakdown else {}
    tr1 = made[1][0]
    return {"times": times, "cpus": cpus, "cpu_ratios": cpu_ratios, "reads": reads, "ratios": ratios, "first": first_read, "parts": parts,
            "in_memory": tr1.train_data.in_memory, "examples": len(tr1.train_data),
            "tokens": int(sum(tr1.train_data.split.offsets["encoder"][:, 1] - tr1.train_data.split.offsets["encoder"][:, 0])),
            "nbytes": tr1.train_data.nbytes, "blocks": tr1.train_data.split.num_blocks}


def compile_comparison(args: argparse.Namespace) -> list[str]:
    """Eager against --compile (rows in memory), interleaved in ABBA rounds per S, from a cold compile cache."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")  # the compile is paid in full
    rows = []
    for seeds in (1, args.seeds):
        arms = {compiled: make(args.cache, seeds, "8GB", args, compiled) for compiled in (False, True)}
        warm_up = {compiled: timed_epoch(*arm, 0)[0] for compiled, arm in arms.items()}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        ratios = []
        for rep in range(args.compile_reps):
            for compiled in ((False, True) if rep % 2 == 0 else (True, False)):
                cpu[compiled].append(timed_epoch(*arms[compiled], rep + 1)[1])
            ratios.append(cpu[True][-1] / cpu[False][-1])
            print(f"  {seeds} seed(s), rep {rep}: cpu eager {cpu[False][-1]:.2f}s compiled {cpu[True][-1]:.2f}s", flush=True)
        rows.append(f"| {seeds} | {statistics.median(cpu[False]):.2f} | {statistics.median(cpu[True]):.2f} | "
                    f"{statistics.median(ratios):.2f} | {warm_up[True]:.1f} (eager: {warm_up[False]:.1f}) |")
    return [f"Eager against `--compile` (in memory; {args.compile_reps} interleaved ABBA rounds per S after a warm-up "
            "epoch; the compiled warm-up epoch pays the whole compile, from an empty compile cache):", "",
            "| seeds | eager CPU s per epoch | --compile CPU s per epoch | ratio compiled/eager (median per round) "
            "| warm-up epoch wall s, compile included |", "|---|---|---|---|---|", *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="bench_out/stores/rte-train300-all.zarr")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rnn-dim", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                        help="memory: rows held in memory; streamed: memory_budget=0")
    parser.add_argument("--compile-reps", type=int, default=3, help="rounds of eager against --compile (0: skip)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    S = args.seeds
    results = {}
    for mode in args.modes:
        print(f"{mode}:", flush=True)
        results[mode] = run_mode(args.cache, MODES[mode], args, with_breakdown=mode == args.modes[0])  # once
    lines = [SECTION, ""]
    r0 = next(iter(results.values()))
    lines.append(f"Store `{args.cache}`: all-MiniLM-L6-v2 on RTE train (first 300 examples, {r0['tokens']} tokens, "
                 f"7 states x 384, bfloat16 per token, {r0['nbytes'] / 2**20:.1f} MiB in {r0['blocks']} block(s)). "
                 f"READ settings: GRU r={args.rnn_dim}, batch {args.batch_size}, dropout 0.1; CPU, "
                 f"torch threads {args.threads} ({platform.processor() or platform.machine()}, 2 shared cores). "
                 f"One epoch = {math.ceil(r0['examples'] / args.batch_size)} steps. Median over {args.reps} "
                 "interleaved (ABBA) rounds after one warm-up epoch; ratio = median of per-round ratios.")
    lines.append("")
    lines.append(f"| data mode | 1 seed: CPU s / wall s per epoch | {S} seeds: CPU s / wall s per epoch | "
                 f"ratio {S}/1 on CPU time (target <= 2.5) | ratio {S}/1 on wall time | "
                 "read time per epoch (1 seed / 5 seeds) | read share of epoch (1 / 5) |")
    lines.append("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        t1, tS = statistics.median(r["times"][1]), statistics.median(r["times"][S])
        rd1, rdS = statistics.median(r["reads"][1]), statistics.median(r["reads"][S])
        if r["in_memory"]:
            read_cell = (f"0 (loaded once before epoch 1: {r['first'][1][1]:.2f} s / {r['first'][S][1]:.2f} s)")
            share = (f"{100 * r['first'][1][1] / (r['first'][1][1] + t1):.1f}% / "
                     f"{100 * r['first'][S][1] / (r['first'][S][1] + tS):.1f}% of a 1-epoch run")
        else:
            read_cell = f"{rd1:.2f} s / {rdS:.2f} s (prefetch thread, overlapped)"
            share = f"{100 * rd1 / t1:.1f}% / {100 * rdS / tS:.1f}%"
        c1, cS = statistics.median(r["cpus"][1]), statistics.median(r["cpus"][S])
        lines.append(f"| {mode} ({'in memory' if r['in_memory'] else 'memory_budget=0'}) | {c1:.2f} / {t1:.2f} | "
                     f"{cS:.2f} / {tS:.2f} | {statistics.median(r['cpu_ratios']):.2f} | "
                     f"{statistics.median(r['ratios']):.2f} | {read_cell} | {share} |")
    if args.compile_reps:
        print("eager against --compile:", flush=True)
        lines += ["", *compile_comparison(args)]
    lines.append("")
    lines.append(f"Where one epoch's time goes ({args.modes[0]} mode, one extra instrumented epoch; process CPU seconds):")
    lines.append("")
    lines.append("| data mode | seeds | batch assembly | forward + loss | backward | clip + AdamW |")
    lines.append("|---|---|---|---|---|---|")
    for mode, r in results.items():
        for s, p in r["parts"].items():
            lines.append(f"| {mode} | {s} | {p['batch']:.2f} | {p['forward']:.2f} | {p['backward']:.2f} | {p['step']:.2f} |")
    lines.append("")
    cmd = ".venv/bin/python benchmarks/train.py " + " ".join(sys.argv[1:])
    lines.append(f"Command: `{cmd.strip()}`" + (f" ({args.label})" if args.label else ""))
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        import quality

        quality.write_section(SECTION, text)


if __name__ == "__main__":
    main()
