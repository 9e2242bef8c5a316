"""What a training checkpoint costs at the paper's shape: its size on disk and the seconds to save and load it.

Run from the repository root (seconds):

    .venv/bin/python benchmarks/checkpoint.py [--seeds 1 5] [--rnn-dim 256] [--d-model 768] [--reps 5] [--dir bench_out]

The READ model of a T5-base backbone (seq2seq, d=``--d-model``, GRU r=``--rnn-dim``, ``--seeds`` seeds in lockstep;
the parameters do not depend on the number of layers), after
one AdamW step (so its moments exist), with every seed's best epoch held (weights and RTE-validation-sized
predictions), is saved through ``pipeline.training.checkpoint.Checkpoints`` exactly as ``pipeline train`` saves
it between steps (serialised, written to a temporary file, fsync'd, renamed), into ``--dir``, then loaded.
The values are random; the size and time do not depend on them. Prints a table to paste into BENCHMARKS.md.

With ``--cache STORE``, also whole `pipeline train` runs (``--epochs``, 3 seeds, r=``--rnn-dim``, one thread) from
that store, saving after every epoch (``checkpoint_seconds=0``, the most a run can save) against never, alternated
in ABBA order over ``--runs`` rounds: the median ratio of their wall times is what saving costs at worst.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.common.config import TrainConfig
from pipeline.training.checkpoint import Checkpoints, RunState
from pipeline.training.model import ReadConfig, ReadModel, trainable_parameter_count

VALIDATION_EXAMPLES = 277  # RTE's validation split


def run_state(seeds: int, rnn_dim: int, d_model: int) -> tuple[RunState, int]:
    """A checkpoint's content for ``seeds`` seeds of a seq2seq backbone of width ``d_model``, and the trainable
    parameters of one seed."""
    config = ReadConfig(family="seq2seq", d_model=d_model, num_labels=2, task_kind="classification", rnn_dim=rnn_dim)
    model = ReadModel(config, list(range(seeds)), label_rows=torch.randn(2, d_model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler.step()
    best = [{"epoch": 1, "metrics": {"accuracy": 50.0}, "state": model.seed_state_dict(k),
             "predictions": {"validation": np.zeros(VALIDATION_EXAMPLES, dtype=np.int64)}} for k in range(seeds)]
    state = RunState(epoch=1, model=model.state_dict(), optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), dropout=model.dropout_state(), best_score=[50.0] * seeds,
                     waited=[0] * seeds, best=best, history=[{"epoch": 0}, {"epoch": 1}], frozen={}, wall_time_s=1.0)
    return state, trainable_parameter_count(model)  # counted per seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--rnn-dim", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=768, help="the backbone's width (768: T5-base)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default="bench_out", help="where to write (the disk a run folder would be on)")
    parser.add_argument("--cache", default=None, help="a store: also time whole runs saving every epoch against never")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2, help="ABBA rounds of whole runs")
    args = parser.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    print(f"{platform.node()}: {platform.machine()}, torch {torch.__version__}; d={args.d_model}, GRU r={args.rnn_dim}; "
          f"median of {args.reps}\n")
    print("| seeds | trainable parameters per seed | checkpoint size | save (serialise, write, fsync, rename) | load |")
    print("|---|---:|---:|---:|---:|")
    for seeds in args.seeds:
        state, per_seed = run_state(seeds, args.rnn_dim, args.d_model)
        with tempfile.TemporaryDirectory(dir=args.dir) as folder:
            checkpoints = Checkpoints(Path(folder), {"benchmark": True}, every_s=0)
            saves, loads = [], []
            for _ in range(args.reps):
                started = time.perf_counter()
                checkpoints.save(state)
                saves.append(time.perf_counter() - started)
                started = time.perf_counter()
                loaded, _ = checkpoints.load()
                loads.append(time.perf_counter() - started)
                assert loaded is not None and loaded.epoch == state.epoch
            size = checkpoints.path.stat().st_size
        print(f"| {seeds} | {per_seed:,} | {size / 2**20:,.1f} MiB | {statistics.median(saves):.2f} s | "
              f"{statistics.median(loads):.2f} s |")
    if args.cache:
        whole_runs(args)


def whole_runs(args: argparse.Namespace) -> None:
    """Whole training runs saving after every epoch against never, alternated (ABBA); the wall times."""
    from pipeline.training import train

    times: dict[float | None, list[float]] = {0.0: [], None: []}
    order = [0.0, None, None, 0.0] * args.runs
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for i, every in enumerate(order):
            cfg = TrainConfig(cache=args.cache, out=str(Path(folder) / f"run{i}"), epochs=args.epochs, patience=None,
                              rnn_dim=args.rnn_dim, device="cpu", threads=1, checkpoint_seconds=every)
            started = time.perf_counter()
            train(cfg, progress=False)
            times[every].append(time.perf_counter() - started)
    saving, never = statistics.median(times[0.0]), statistics.median(times[None])
    print(f"\n{args.cache}: {args.epochs} epochs, 3 seeds, r={args.rnn_dim}, one thread, {len(order)} runs (ABBA): "
          f"saving after every epoch {saving:.1f} s, never {never:.1f} s (median wall time); ratio {saving / never:.3f}")
    print("each run, in order: " + ", ".join(f"{'saving' if every == 0.0 else 'never'} {t:.1f} s"
                                               for every, t in zip(order, _in_order(order, times))))


def _in_order(order: list[float | None], times: dict[float | None, list[float]]) -> list[float]:
    """The runs' wall times in the order they ran."""
    seen = {every: iter(values) for every, values in times.items()}
    return [next(seen[every]) for every in order]


if __name__ == "__main__":
    main()
