"""Peak memory of stage one's batches at the paper's shape, measured on the CPU: what a GPU holds for them.

Run from the repository root (a few minutes on a CPU):

    .venv/bin/python benchmarks/memory.py --task rte --glue-dir ../shared/data/glue \
        --tokenizer ../shared/models/t5-base-shape [--batch-tokens 16384 8192 4096]

A randomly initialised model of a named shape (``--shape``, t5-base by default: the values do not change what is
allocated) reads the task's train split tokenised as extraction tokenises it. For each ``--batch-tokens``, the
batch with the most padded tokens (where an epoch's memory peaks) runs once on the CPU in bf16 autocast, as on
CUDA: the plain frozen forward (nothing kept), then extraction's batch (the forward, each state copied into the
block's buffer as the forward makes it, as on a GPU). torch's profiler records every allocation
(``pipeline.common.resources.peak_tensor_bytes``); the most bytes alive at once, plus the weights, is what
``torch.cuda.max_memory_allocated`` says on a GPU for the same operators, less what the CUDA libraries allocate
for themselves (cuBLAS workspaces: tens of MiB). ``benchmarks/gpu.py`` measured the 16,384-token case on an H200
(BENCHMARKS.md), which says how close this comes. Appends nothing to BENCHMARKS.md; prints a table to paste.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch
from extract import plain_forward, planned_batches

from pipeline.common.config import ExtractConfig
from pipeline.common.resources import peak_tensor_bytes
from pipeline.common.settings import field_of
from pipeline.common.tasks import get_task
from pipeline.extraction import Extraction
from pipeline.extraction.backbones import Backbone, linear_weights_to, load_backbone
from pipeline.extraction.shapes import build_random_backbone
from pipeline.extraction.stage import StateSink, gather_splits, into_sinks
from pipeline.store.format import torch_dtype

MIB = 2**20


def extraction_batch(ext: Extraction, batch: list[list[int]]) -> None:
    """One batch as extraction runs it on a GPU: each state, as the forward makes it, gathered, converted and
    placed in the block's buffer (allocated here: it lives as long as its block), as ``Extraction`` does."""
    bb, cfg = ext.backbone, ext.cfg
    lengths = bb.state_lengths(batch)
    sinks = {}
    for side, layers in ext.layers.items():
        block = torch.zeros((ext.limits[side], len(layers), bb.d_model), dtype=torch_dtype(cfg.dtype))
        rows = lengths[side] if ext.per_token[side] else [1] * len(batch)
        starts = list(itertools.accumulate(rows, initial=0))[:-1]
        sinks[side] = StateSink(block, cfg.dtype, lengths[side], starts, pooled=not ext.per_token[side])
    bb.forward(batch, into_sinks(sinks, ext.layers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="rte")
    parser.add_argument("--glue-dir", required=True)
    parser.add_argument("--tokenizer", default=None, help="copy this folder's tokenizer instead of training one")
    parser.add_argument("--shape", default="t5-base", help="a shape of pipeline.extraction.shapes")
    parser.add_argument("--batch-tokens", type=int, nargs="+",
                        default=[field_of(ExtractConfig, "batch_tokens").default, 4096])
    parser.add_argument("--max-length", type=int, default=field_of(ExtractConfig, "max_length").default)
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="memory-bench-"))
    model_path = build_random_backbone(args.shape, work / "model", glue_dir=args.glue_dir, tokenizer=args.tokenizer)
    backbone: Backbone = load_backbone(str(model_path), dtype="bfloat16", device="cpu")
    backbone.autocast_dtype = torch.bfloat16  # as load_backbone does on CUDA (on a CPU it computes in float32)
    linear_weights_to(backbone.model, backbone.autocast_dtype)
    weights = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    print("| batch_tokens | largest batch (examples x padded width) | plain forward MiB | extraction batch MiB |")
    print("|---|---|---|---|")
    for batch_tokens in args.batch_tokens:
        cfg = ExtractConfig(model=str(model_path), task=args.task, out=str(work / "x.zarr"), glue_dir=args.glue_dir,
                            splits=("train",), max_length=args.max_length, batch_tokens=batch_tokens,
                            dtype="bfloat16", device="cpu", tokens="all")
        ext = Extraction(cfg, progress=False, data=gather_splits(cfg, get_task(args.task)), backbone=backbone)
        batches, _, _ = planned_batches(ext, "train")
        largest = max(batches, key=lambda b: len(b) * max(len(ids) for ids in b))
        plain = peak_tensor_bytes(lambda: plain_forward(backbone, [largest]))
        extraction = peak_tensor_bytes(lambda: extraction_batch(ext, largest))
        print(f"| {batch_tokens:,} | {len(largest)} x {max(len(ids) for ids in largest)} | "
              f"{(weights + plain) / MIB:,.0f} | {(weights + extraction) / MIB:,.0f} |", flush=True)
    blocks = sum(rows * len(ext.layers[side]) * backbone.d_model * torch_dtype(cfg.dtype).itemsize
                 for side, rows in ext.limits.items())
    print(f"\nRandom `{args.shape}` shape, {args.task} train, weights {weights / MIB:,.0f} MiB (linear layers in bf16, "
          f"the rest float32, as loaded for CUDA; counted in both columns), the block buffers {blocks / MIB:,.0f} "
          "MiB (in the extraction column); bf16 autocast; "
          f"torch {torch.__version__}, {platform.machine()}. Command: "
          f"`.venv/bin/python benchmarks/memory.py {' '.join(sys.argv[1:])}`")


if __name__ == "__main__":
    main()
