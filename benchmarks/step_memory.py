"""Activation memory and arithmetic of one stage-two training step at the paper's shape: eager against ``--compile``.

Run from the repository root (a few minutes on a CPU, most of it the compile):

    .venv/bin/python benchmarks/step_memory.py [--seeds 1 5] [--tokens 2560]

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
(views and allocations left out; each launches one kernel or more on a GPU) say what bounds it there. Appends
nothing to BENCHMARKS.md; prints a table to paste.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from pipeline.training import fused_gru  # noqa: E402
from pipeline.training.model import ReadConfig, ReadModel, StepLoss  # noqa: E402
from pipeline.training.network import SideBatch  # noqa: E402


def t5_base_batch(tokens: int, examples: int = 32, states: int = 13, d: int = 768) -> SideBatch:
    g = torch.Generator().manual_seed(0)
    per_example = torch.full((examples,), tokens // examples)
    per_example[: tokens - int(per_example.sum())] += 1
    return SideBatch(labels=torch.randint(0, 2, (examples,), generator=g),
                     encoder=torch.randn(tokens, states, d, generator=g).to(torch.bfloat16),
                     encoder_segment=torch.repeat_interleave(torch.arange(examples), per_example),
                     decoder=torch.randn(examples, states, d, generator=g).to(torch.bfloat16))


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


def step_flops(model: ReadModel, batch: SideBatch) -> int:
    """Floating-point operations of one training step, forward and backward (matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        saved_bytes(model, batch)
    return counter.get_total_flops()


def step_operators(model: ReadModel, batch: SideBatch) -> int:
    """Operators one eager step (dropout masks, forward, loss, backward) dispatches to a device, views and
    allocations left out. Each launches one kernel or more on a GPU (a slice's backward: two), and pays the
    dispatcher's and autograd's host time: what bounds an eager step there."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.operators = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if not func.is_view and func.overloadpacket not in (torch.ops.aten.empty, torch.ops.aten.empty_strided):
                self.operators += 1
            return func(*args, **(kwargs or {}))

    with Count() as count:
        saved_bytes(model, batch)
    return count.operators


@contextmanager
def as_on_cuda() -> Iterator[None]:
    """The eager step as it runs on CUDA: GRU layer steps through torch's fused cell kernels (``fused_gru``), here
    their torch-operator stand-ins, each registered as one operator so that ``step_operators`` counts one for each
    kernel, as a GPU launches one. The workspace and what the step saves are the kernels' own."""
    cell = torch.library.custom_op("read_bench::gru_cell", fused_gru.reference_cell, mutates_args=())
    cell_backward = torch.library.custom_op("read_bench::gru_cell_backward", fused_gru.reference_cell_backward,
                                            mutates_args=())
    saved = fused_gru.applies, fused_gru._cell, fused_gru._cell_backward
    fused_gru.applies, fused_gru._cell, fused_gru._cell_backward = (lambda x: True), cell, cell_backward
    try:
        yield
    finally:
        fused_gru.applies, fused_gru._cell, fused_gru._cell_backward = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--tokens", type=int, default=2560, help="encoder tokens in the batch (RTE: about 80 x 32)")
    parser.add_argument("--rnn-dim", type=int, default=256)
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure with torch.compile (minutes on a CPU)")
    args = parser.parse_args()
    batch = t5_base_batch(args.tokens)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")  # the compile is paid in full
    print("| seeds | parameters (all seeds) MiB | saved for backward, eager MiB | with --compile MiB | compile s | "
          "GFLOP per step | operators per step, eager | eager on CUDA (fused GRU cell): saved MiB, operators |")
    print("|---|---|---|---|---|---|---|---|")
    for seeds in args.seeds:
        config = ReadConfig(family="seq2seq", d_model=768, num_labels=2, task_kind="classification",
                            rnn_dim=args.rnn_dim)
        model = ReadModel(config, list(range(seeds)), label_rows=torch.randn(2, 768)).train()
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
