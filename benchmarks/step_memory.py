"""Activation memory and arithmetic of one stage-two training step at the paper's shape: eager against ``--compile``.

Run from the repository root (a few minutes on a CPU, most of it the compile):

    .venv/bin/python benchmarks/step_memory.py [--seeds 1 5] [--tokens 2560] [--host-time | --peaks]

A batch like RTE's under a T5-base backbone (32 examples, ``--tokens`` encoder tokens, 13 stored
states per side of width 768; random values: memory does not depend on them) goes through the READ
model (seq2seq, GRU r=256, dropout 0.1) the way ``Trainer.train_epoch`` runs it. What is measured is
the bytes autograd keeps for the backward pass (``torch.autograd.graph.saved_tensors_hooks``), which
with the parameters, their gradients, the optimiser state and the batch is what a step's peak memory
is made of. It does not depend on the device: torch.compile decides what to keep and what to
recompute on its joint forward-backward graph, before generating code for a CPU or a GPU.
The compile starts from an empty cache. The step's floating-point operations, forward and backward
(``torch.utils.flop_counter``: matrix products only, which are nearly all of them), say how long the
step must take on a given card once kernel launches no longer bound it; the operators an eager step dispatches
(views and allocations left out; each launches one kernel or more on a GPU) say what bounds it there, counted for
the step as the CPU runs it and as CUDA runs it (the fused GRU cell kernels, here stood in for, one operator each).
``--host-time`` instead times that bound itself: the host's milliseconds per eager step at a tiny width, where the
arithmetic is negligible, the composite step against the step as on CUDA with kernels that do no arithmetic.
``--peaks`` instead measures the most memory a training step and an evaluation batch hold at once (from the CPU
allocator's events: the tensors a GPU would hold), composite and as on CUDA. ``--launches`` instead counts the
operators a whole step of ``Trainer.train_epoch`` dispatches (the batch's gather, dropout masks, forward, backward,
clipping, fused AdamW, the schedule, the loss bookkeeping; as on CUDA), eager and under ``--cuda-graphs``: there,
those outside the recorded graph, plus one replay, against the graph's own (``tests/graph_tape.py`` stands in for
CUDA graphs). Appends nothing to BENCHMARKS.md; prints a table to paste.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.common.resources import peak_tensor_bytes
from pipeline.training import fused_gru
from pipeline.training.model import ReadConfig, ReadModel, StepLoss
from pipeline.training.network import SideBatch
from pipeline.training.trainer import EVAL_BATCH_EXAMPLES


def t5_base_batch(tokens: int, examples: int = 32, states: int = 13, d: int = 768) -> SideBatch:
    g = torch.Generator().manual_seed(0)
    per_example = torch.full((examples,), tokens // examples)
    per_example[: tokens - int(per_example.sum())] += 1
    return SideBatch(labels=torch.randint(0, 2, (examples,), generator=g),
                     encoder=torch.randn(tokens, states, d, generator=g).to(torch.bfloat16),
                     encoder_segment=torch.repeat_interleave(torch.arange(examples), per_example),
                     decoder=torch.randn(examples, states, d, generator=g).to(torch.bfloat16))


def t5_base_read_model(seeds: int, rnn_dim: int) -> ReadModel:
    """The READ model the benchmark measures: seq2seq over T5-base's width, ``seeds`` seeds, in training mode."""
    config = ReadConfig(family="seq2seq", d_model=768, num_labels=2, task_kind="classification", rnn_dim=rnn_dim)
    return ReadModel(config, list(range(seeds)), label_rows=torch.randn(2, 768)).train()


def saved_bytes(model: ReadModel, batch: SideBatch, step: Callable[..., torch.Tensor] | None = None) -> int:
    """Bytes of every tensor autograd saves during the forward (each storage once), the step run as
    ``Trainer.train_epoch`` runs it: dropout masks drawn first, then ``step`` (the Trainer's ``StepLoss``, or its
    compiled form) to the per-seed losses."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step = StepLoss(model, "classification") if step is None else step
        loss = step(batch, model.dropout_masks(batch)).sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def step_peak(model: ReadModel, batch: SideBatch) -> int:
    """Peak bytes of one eager training step (dropout masks, forward, loss, backward), the batch already there."""
    def step() -> None:
        StepLoss(model, "classification")(batch, model.dropout_masks(batch)).sum().backward()

    model.zero_grad(set_to_none=False)  # gradients exist from an earlier step, as in training
    step()
    return peak_tensor_bytes(step)


def eval_peak(model: ReadModel, batch: SideBatch) -> int:
    """Peak bytes of one evaluation batch (no gradient), the batch already there."""
    model.eval()
    try:
        with torch.no_grad():
            return peak_tensor_bytes(lambda: model(batch))
    finally:
        model.train()


def step_flops(model: ReadModel, batch: SideBatch) -> int:
    """Floating-point operations of one training step, forward and backward (matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        saved_bytes(model, batch)
    return counter.get_total_flops()


def launches(func: torch._ops.OpOverload) -> bool:
    """Whether an operator launches work on a device: views, allocations and profiler marks do not."""
    return not (func.is_view or func.namespace == "profiler"
                or func.overloadpacket in (torch.ops.aten.empty, torch.ops.aten.empty_strided))


class OperatorCount(TorchDispatchMode):
    """Counts the operators dispatched while it is on (``launches``), unless ``paused``."""

    def __init__(self) -> None:
        super().__init__()
        self.operators, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.operators += not self.paused and launches(func)
        return func(*args, **(kwargs or {}))


def step_operators(model: ReadModel, batch: SideBatch) -> int:
    """Operators one eager step (dropout masks, forward, loss, backward) dispatches to a device, views and
    allocations left out. Each launches one kernel or more on a GPU (a slice's backward: two), and pays the
    dispatcher's and autograd's host time: what bounds an eager step there."""
    with OperatorCount() as count:
        saved_bytes(model, batch)
    return count.operators


@contextmanager
def as_on_cuda(kernels: str = "stand-ins") -> Iterator[None]:
    """The eager step as it runs on CUDA: each side's GRU recurrence through torch's fused cell kernels
    (``fused_gru``). Here the kernels are their torch-operator stand-ins, each registered as one operator so that
    ``step_operators`` counts one for each kernel, as a GPU launches one; the workspace and what the step saves
    are the kernels' own. ``kernels="empty"``: kernels that only allocate their outputs, so that what is timed is
    the step's host time alone (dispatch, autograd, Python), which is what bounds an eager step on a GPU."""
    if kernels == "empty":
        def cell(gx: torch.Tensor, gh: torch.Tensor, hx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.empty_like(hx), hx.new_empty(hx.shape[0], fused_gru.WORKSPACE_BLOCKS * hx.shape[1])

        def cell_backward(grad: torch.Tensor, workspace: torch.Tensor) -> tuple[torch.Tensor, ...]:
            gates = workspace.new_empty(workspace.shape[0], 3 * grad.shape[1])
            return gates, torch.empty_like(gates), torch.empty_like(grad)
    else:
        cell = torch.library.custom_op("read_bench::gru_cell", fused_gru.reference_cell, mutates_args=())
        cell_backward = torch.library.custom_op("read_bench::gru_cell_backward", fused_gru.reference_cell_backward,
                                                mutates_args=())
    saved = fused_gru.applies, fused_gru._cell, fused_gru._cell_backward
    fused_gru.applies, fused_gru._cell, fused_gru._cell_backward = (lambda x: True), cell, cell_backward
    try:
        yield
    finally:
        fused_gru.applies, fused_gru._cell, fused_gru._cell_backward = saved


def host_ms_per_step(seeds: int, rounds: int) -> dict[str, float]:
    """Milliseconds of host time per eager step (dropout masks, forward, loss, backward), the seq2seq READ model
    at a tiny width (d=64, r=16, 13 states a side, 8 examples of 8 tokens; one thread) so that the arithmetic is
    negligible and what is left is dispatch, autograd and Python: the composite step, and the step as on CUDA with
    kernels that do no arithmetic. Median over ``rounds`` alternated rounds of 200 steps each."""
    torch.set_num_threads(1)
    batch = t5_base_batch(64, examples=8, d=64)
    config = ReadConfig(family="seq2seq", d_model=64, num_labels=2, task_kind="classification", rnn_dim=16)
    model = ReadModel(config, list(range(seeds)), label_rows=torch.randn(2, 64)).train()
    step = StepLoss(model, "classification")

    def steps(n: int) -> float:
        started = time.perf_counter()
        for _ in range(n):
            step(batch, model.dropout_masks(batch)).sum().backward()
            model.zero_grad(set_to_none=True)
        return (time.perf_counter() - started) / n * 1e3

    ways = {"composite": nullcontext, "fused cell (CUDA), kernels empty": lambda: as_on_cuda("empty")}
    times: dict[str, list[float]] = {way: [] for way in ways}
    for context in ways.values():
        with context():
            steps(20)  # warm-up
    for r in range(rounds):
        for way in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            with ways[way]():
                times[way].append(steps(200))
    return {way: statistics.median(t) for way, t in times.items()}


def print_peaks(args: argparse.Namespace) -> None:
    """The peak bytes of a training step and of an evaluation batch (as many tokens per example as ``--tokens``
    gives the training batch's 32), composite and as on CUDA (kernels that allocate their outputs alone, as the real
    ones do: the stand-ins' temporaries would count where no GPU allocates them): a table to paste."""
    per_example = args.tokens / 32
    train, evaluation = t5_base_batch(args.tokens), t5_base_batch(round(per_example * args.eval_examples),
                                                                  examples=args.eval_examples)
    print("| seeds | saved for backward MiB | training step: composite, as on CUDA MiB | evaluation batch: composite, "
          "as on CUDA MiB |")
    print("|---|---|---|---|")
    for seeds in args.seeds:
        model = t5_base_read_model(seeds, args.rnn_dim)
        peaks = [step_peak(model, train), eval_peak(model, evaluation)]
        with as_on_cuda("empty"):  # kernels that allocate what torch's do, their outputs, and no temporaries
            peaks += [step_peak(model, train), eval_peak(model, evaluation)]
        mib = [f"{p / 2**20:,.0f}" for p in peaks]
        print(f"| {seeds} | {saved_bytes(model, train) / 2**20:,.0f} | {mib[0]}, {mib[2]} | {mib[1]}, {mib[3]} |",
              flush=True)
    print(f"\nTraining batch: 32 examples, {args.tokens} encoder tokens; evaluation batch: {args.eval_examples} "
          f"examples, {evaluation.encoder.shape[0]} tokens; 13 states x 768 per side (bf16), GRU r={args.rnn_dim}; "
          f"bytes above the batch's, parameters' and gradients'; torch {torch.__version__}. Command: "
          f"`.venv/bin/python benchmarks/step_memory.py {' '.join(sys.argv[1:])}`")


def count_launches(seeds: int, rnn_dim: int) -> dict[str, float]:
    """Operators per step of a second epoch of ``Trainer.train_epoch`` (seq2seq, 13 states a side, batches of 32;
    a synthetic store at a small width: the count does not depend on it), as on CUDA (fused GRU cell stand-ins,
    fused AdamW): eager, and with the step recorded (outside the graph; replays; the graph's own operators)."""
    sys.path.insert(0, str(REPO / "tests"))
    from graph_tape import TapeRecorder
    from synthetic import write_synthetic_store

    from pipeline.common.config import TrainConfig
    from pipeline.training.trainer import Trainer

    count = OperatorCount()

    class Recorder(TapeRecorder):
        """The stand-in, each replay counted as the one launch it is on a GPU."""

        def record(self, run):  # type: ignore[no-untyped-def]
            replay, out = super().record(run)

            def one_launch() -> None:
                count.paused = True
                try:
                    replay()
                finally:
                    count.paused = False
                count.operators += 1

            return one_launch, out

    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as work, as_on_cuda():
        cache = write_synthetic_store(Path(work) / "s.zarr", splits={"train": 800, "validation": 40}, max_tokens=24,
                                      num_states=13, d_model=32, block_tokens=4096).path
        for mode in ("eager", "recorded"):
            recorder = Recorder() if mode == "recorded" else None
            cfg = TrainConfig(cache=cache, out=str(Path(work) / mode), seeds=tuple(range(seeds)), rnn_dim=rnn_dim,
                              batch_size=32, device="cpu", patience=None)
            trainer = Trainer(cfg, progress=False, recorder=recorder)
            optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=torch.tensor(cfg.lr), fused=True)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
            if recorder is not None:
                optimizer, scheduler = trainer.optimizer()  # fused, its learning rate a tensor, as on CUDA
            trainer.train_epoch(1, optimizer, scheduler)  # the first steps of each shape: eager, then recorded
            per_step: list[tuple[int, bool]] = []  # (operators, replayed) of each step of the second epoch
            marks = {"operators": 0, "replays": recorder.replays if recorder else 0}

            def phase(name: str) -> None:
                if name == "step":
                    replays = recorder.replays if recorder else 0
                    per_step.append((count.operators - marks["operators"], replays > marks["replays"]))
                    marks.update(operators=count.operators, replays=replays)

            count.operators = 0
            with count:
                trainer.train_epoch(2, optimizer, scheduler, phase=phase)
            # the step's own operators; after it, the loss bookkeeping (counted with the next step's)
            replayed = [n for n, was in per_step[1:] if was]
            eager = [n for n, was in per_step[1:] if not was]
            figures["steps"] = len(per_step)
            if recorder is None:
                figures["eager per step"] = statistics.median(eager)
            else:
                figures["replayed"] = len(replayed) + per_step[0][1]
                figures["replayed per step"] = statistics.median(replayed)
                figures["graph operators"] = statistics.median(
                    sum(launches(func) for func, *_ in tape.ops) for tape in recorder.tapes)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--tokens", type=int, default=2560, help="encoder tokens in the batch (RTE: about 80 x 32)")
    parser.add_argument("--rnn-dim", type=int, default=256)
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure with torch.compile (minutes on a CPU)")
    parser.add_argument("--host-time", action="store_true",
                        help="only time the host's part of an eager step at a tiny width, composite and as on CUDA")
    parser.add_argument("--rounds", type=int, default=7, help="alternated rounds for --host-time")
    parser.add_argument("--peaks", action="store_true",
                        help="only measure the peak memory of a training step and of an evaluation batch, composite "
                             "and as on CUDA")
    parser.add_argument("--launches", action="store_true",
                        help="only count the operators of whole training steps, eager and recorded as CUDA graphs")
    parser.add_argument("--eval-examples", type=int, default=EVAL_BATCH_EXAMPLES,
                        help="examples in the --peaks evaluation batch (the Trainer's evaluation batch size)")
    args = parser.parse_args()
    if args.launches:
        for seeds in args.seeds:
            f = count_launches(seeds, args.rnn_dim)
            print(f"{seeds} seed(s), a second epoch of {f['steps']:.0f} steps, operators per step as on CUDA (median): "
                  f"eager {f['eager per step']:.0f}; --cuda-graphs, a replayed step ({f['replayed']:.0f} of them) "
                  f"{f['replayed per step']:.0f} including its one launch, the graph holding "
                  f"{f['graph operators']:.0f}", flush=True)
        return
    if args.peaks:
        print_peaks(args)
        return
    if args.host_time:
        for seeds in args.seeds:
            ms = host_ms_per_step(seeds, args.rounds)
            print(f"{seeds} seed(s): host ms per eager step, median of {args.rounds} alternated rounds: "
                  + ", ".join(f"{way} {v:.2f}" for way, v in ms.items())
                  + f" (ratio {ms['fused cell (CUDA), kernels empty'] / ms['composite']:.2f})", flush=True)
        return
    batch = t5_base_batch(args.tokens)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")  # the compile is paid in full
    print("| seeds | parameters (all seeds) MiB | saved for backward, eager MiB | with --compile MiB | compile s | "
          "GFLOP per step | operators per step, eager | eager on CUDA (fused GRU cell): saved MiB, operators |")
    print("|---|---|---|---|---|---|---|---|")
    for seeds in args.seeds:
        model = t5_base_read_model(seeds, args.rnn_dim)
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        eager = saved_bytes(model, batch)
        fused, compile_s = "not run", "-"
        if args.compiled:
            compiled = torch.compile(StepLoss(model, "classification"), dynamic=True)  # as the Trainer compiles
            started = time.perf_counter()
            saved_bytes(model, batch, compiled)  # the compile
            compile_s = f"{time.perf_counter() - started:.0f}"
            fused = f"{saved_bytes(model, batch, compiled) / 2**20:,.0f}"
        flops = step_flops(model, batch)
        operators = step_operators(model, batch)
        with as_on_cuda():
            on_cuda = f"{saved_bytes(model, batch) / 2**20:,.0f}, {step_operators(model, batch):,}"
        print(f"| {seeds} | {params / 2**20:.1f} | {eager / 2**20:,.0f} | {fused} | {compile_s} | {flops / 1e9:,.0f} "
              f"| {operators:,} | {on_cuda} |", flush=True)
    print(f"\n{args.tokens} encoder tokens, 32 examples, 13 states x 768 per side, GRU r={args.rnn_dim}; torch "
          f"{torch.__version__}, {platform.machine()}. Command: `.venv/bin/python benchmarks/step_memory.py "
          f"{' '.join(sys.argv[1:])}`".rstrip())


if __name__ == "__main__":
    main()
