"""Stage two's work: train READ side networks for several seeds in lockstep, from the store alone.

Nothing here imports transformers or touches the backbone: everything comes from the store's
arrays and attributes (label rows, family, layer layout).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.common.config import TrainConfig
from pipeline.common.errors import ConfigError, StoreCorruptError, TrainingError
from pipeline.common.files import atomic_write_csv, atomic_write_text
from pipeline.common.progress import progress_bar
from pipeline.common.resources import ResourceMeter, pick_device
from pipeline.common.tasks import TaskSpec, get_task
from pipeline.store import CacheStore
from pipeline.training.adapter import AdapterConfig, remove_stale_adapters, save_adapter
from pipeline.training.batches import SplitBatches
from pipeline.training.metrics import compute_metrics, primary_metric
from pipeline.training.model import (
    ReadConfig,
    ReadModel,
    clip_grad_norm_per_seed,
    per_seed_loss,
    trainable_parameter_count,
)

log = logging.getLogger(__name__)


def read_config_for(store: CacheStore, cfg: TrainConfig, task: TaskSpec) -> ReadConfig:
    """The side network's shape, from the store's metadata and the training settings."""
    bb, layout = store.meta.backbone, store.meta.layout
    family = bb.family
    side = "encoder" if family == "encoder" else "decoder"
    has_embedding = all(layout.has_embedding.values())
    if cfg.h0 == "embedding" and not has_embedding:
        raise ConfigError(
            f"--h0 embedding needs the embedding output (state 0) in the store, but {store.path} kept layers "
            f"{layout.layers}; re-extract with --layers all (or a list with 0), or use --h0 zero"
        )
    side_settings = cfg.side_settings()
    side_settings.update(pooling=cfg.pooling if family == "encoder" else "mean",
                         encoder_side=cfg.encoder_side if family == "seq2seq" else True)
    return ReadConfig(
        **side_settings, family=family, d_model=bb.d_model, num_labels=task.num_labels, task_kind=task.kind,
        has_embedding=has_embedding and layout.layers[side][0] == 0,
    )


def check_store(store: CacheStore, cfg: TrainConfig, task: TaskSpec, splits: list[str]) -> None:
    """Refuse what training cannot serve, before any work."""
    store.require_complete(splits)
    if not store.meta.consistent:
        raise StoreCorruptError(f"{store.path}: metadata does not match its fingerprint; run `pipeline verify`")
    for name in splits:
        labels = store.split(name).labels
        if task.kind == "classification":
            bad = (labels < 0) | (labels >= task.num_labels)
            if bad.any():
                raise TrainingError(
                    f"{name} has {int(bad.sum())} labels outside 0..{task.num_labels - 1} "
                    f"(unlabeled test split?); train and evaluate on labeled splits (--train-split/--eval-splits)"
                )
        elif not np.isfinite(labels).all():
            raise TrainingError(f"{name} has unlabeled (nan) scores; train and evaluate on labeled splits")
    family = store.meta.backbone.family
    if task.kind == "classification" and family != "encoder":
        rows = store.label_rows()
        if rows is None or rows.shape[0] != task.num_labels:
            raise TrainingError(
                f"the {family} head needs {task.num_labels} LM-head label rows in the store, found "
                f"{None if rows is None else rows.shape[0]}; re-extract with this version"
            )


def remove_stale_outputs(out: Path, seeds: Iterable[int], splits: Iterable[str]) -> None:
    """Drop what an earlier run into ``out`` left that this run did not write: other seeds' adapters and
    other splits' predictions, so the folder describes this run alone (nothing but those is touched)."""
    remove_stale_adapters(out / "adapters", seeds)
    current = {f"{name}.csv" for name in splits}
    for path in (out / "predictions").glob("*.csv"):
        if path.name not in current and path.is_file() and not path.is_symlink():
            path.unlink()


def lr_lambda(total_steps: int, warmup_ratio: float):
    """Linear warm-up then linear decay to zero."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


class Trainer:
    """Everything one `pipeline train` needs: store, data, model, optimiser, bookkeeping."""

    def __init__(self, cfg: TrainConfig, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.progress = progress
        self.store = CacheStore(cfg.cache)
        self.task = get_task(self.store.meta.task.name)
        self.eval_splits = list(cfg.eval_splits or self.task.validation_splits)
        check_store(self.store, cfg, self.task, [cfg.train_split, *self.eval_splits])
        self.device = pick_device(cfg.device)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        label_dtype = torch.long if self.task.kind == "classification" else torch.float32

        def batches(name: str) -> SplitBatches:
            split = self.store.split(name)
            labels = torch.from_numpy(np.asarray(split.labels)).to(label_dtype)
            return SplitBatches(split, labels, memory_budget=cfg.memory_budget, shuffle_buffer=cfg.shuffle_buffer)

        self.train_data = batches(cfg.train_split)
        self.eval_data = {name: batches(name) for name in self.eval_splits}
        for data in (self.train_data, *self.eval_data.values()):
            data.preload()  # a damaged block stops the run here, before any training
        self.read_config = read_config_for(self.store, cfg, self.task)
        rows = self.store.label_rows()
        rows_t = torch.from_numpy(rows) if rows is not None and self.read_config.uses_label_rows else None
        self.model = ReadModel(self.read_config, list(cfg.seeds), label_rows=rows_t).to(self.device)
        self.primary = primary_metric(self.task)
        self.out = Path(cfg.out_dir(self.task.name))

    # ---- one epoch -----------------------------------------------------------------------------
    def _train_epoch(self, epoch: int, optimizer: torch.optim.Optimizer, scheduler: Any) -> np.ndarray:
        self.model.train()
        totals, count = np.zeros(len(self.cfg.seeds)), 0
        batches = self.train_data.epoch(self.cfg.batch_size, shuffle=True, seed=self.cfg.data_seed * 100_003 + epoch)
        steps = math.ceil(len(self.train_data) / self.cfg.batch_size)
        for _, batch in progress_bar(batches, total=steps, desc=f"epoch {epoch}", unit="batch",
                                     enabled=self.progress, leave=False):
            batch = batch.to(self.device, non_blocking=True)
            losses = per_seed_loss(self.model(batch), batch.labels, self.task.kind)  # (S,)
            if not torch.isfinite(losses).all():
                bad = [s for s, ok in zip(self.cfg.seeds, torch.isfinite(losses).tolist()) if not ok]
                raise TrainingError(
                    f"non-finite training loss at epoch {epoch} for seed(s) {bad}; lower --lr or check the store "
                    "with `pipeline verify`"
                )
            losses.sum().backward()  # seeds share no parameters: each gets its own gradient
            clip_grad_norm_per_seed(self.model, self.cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            totals += losses.detach().cpu().numpy() * batch.num_examples
            count += batch.num_examples
        return totals / max(count, 1)

    @torch.no_grad()
    def predict(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Predictions (S, n) in split order, and the labels (n,)."""
        self.model.eval()
        data = self.eval_data[name]
        n = len(data)
        preds = np.zeros((len(self.cfg.seeds), n), dtype=np.float32 if self.task.kind == "regression" else np.int64)
        for index, batch in data.epoch(max(self.cfg.batch_size, 256), shuffle=False):
            out = self.model(batch.to(self.device))
            values = out if self.task.kind == "regression" else out.argmax(-1)
            preds[:, index] = values.cpu().numpy()
        return preds, np.asarray(data.split.labels)

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, S = self.cfg, len(self.cfg.seeds)
        steps = cfg.epochs * math.ceil(len(self.train_data) / cfg.batch_size)
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, cfg.warmup_ratio))
        best_score = np.full(S, -np.inf)
        best: list[dict[str, Any]] = [{} for _ in range(S)]
        waited = np.zeros(S, dtype=int)
        history: list[dict[str, Any]] = []
        main_split = self.eval_splits[0]
        with ResourceMeter(self.device) as meter:
            for epoch in range(1, cfg.epochs + 1):
                train_loss = self._train_epoch(epoch, optimizer, scheduler)
                per_seed: list[dict[str, float]] = [{} for _ in range(S)]
                predictions = {}
                for name in self.eval_splits:
                    preds, labels = self.predict(name)
                    predictions[name] = preds
                    for k in range(S):
                        metrics = compute_metrics(self.task, preds[k], labels)
                        prefix = "" if name == main_split else f"{name}/"
                        per_seed[k].update({prefix + m: v for m, v in metrics.items()})
                for k in range(S):
                    score = per_seed[k][self.primary]
                    if score > best_score[k]:
                        best_score[k], waited[k] = score, 0
                        best[k] = {"epoch": epoch, "metrics": per_seed[k], "state": self.model.seed_state_dict(k),
                                   "predictions": {n: p[k].copy() for n, p in predictions.items()}}
                    else:
                        waited[k] += 1
                history.append(self._history_row(epoch, train_loss, per_seed))
                log.info("epoch %d: loss %.4f, %s %s", epoch, train_loss.mean(), self.primary,
                         " ".join(f"{m[self.primary]:.2f}" for m in per_seed))
                if self.progress:
                    print(f"epoch {epoch}/{cfg.epochs}  loss {train_loss.mean():.4f}  {self.primary} "
                          + " ".join(f"{m[self.primary]:.2f}" for m in per_seed), file=sys.stderr)
                if cfg.patience is not None and (waited >= cfg.patience).all():
                    break
        for k in range(S):
            self.model.load_seed_state_dict(k, best[k]["state"])
        return self._write_outputs(best, history, meter.summary(), epochs_run=epoch)

    def _history_row(self, epoch: int, train_loss: np.ndarray, per_seed: list[dict[str, float]]) -> dict[str, Any]:
        # "primary": the selection metric under one name for every task, so dvc plots can chart it.
        row: dict[str, Any] = {"epoch": epoch, "train_loss": round(float(train_loss.mean()), 6),
                               "primary": round(float(np.mean([m[self.primary] for m in per_seed])), 4)}
        for metric in per_seed[0]:
            row[metric] = round(float(np.mean([m[metric] for m in per_seed])), 4)
        for seed, metrics in zip(self.cfg.seeds, per_seed):
            row[f"{self.primary}_seed{seed}"] = round(metrics[self.primary], 4)
        return row

    def _write_outputs(self, best: list[dict[str, Any]], history: list[dict[str, Any]],
                       resources: dict[str, Any], epochs_run: int) -> dict[str, Any]:
        cfg, out = self.cfg, self.out
        out.mkdir(parents=True, exist_ok=True)
        for k, seed in enumerate(cfg.seeds):
            # The adapter records the backbone and extraction settings: `pipeline predict` rebuilds its inputs.
            adapter = AdapterConfig.from_store_meta(self.store.meta, self.read_config, seed)
            save_adapter(out / "adapters" / f"seed_{seed}", self.model, k, adapter)
        metric_names = list(best[0]["metrics"])
        seeds = {str(seed): {"best_epoch": b["epoch"], **b["metrics"]} for seed, b in zip(cfg.seeds, best)}
        values = {m: np.array([b["metrics"][m] for b in best]) for m in metric_names}
        metrics = {
            "task": self.task.name,
            "method": cfg.method,
            "primary_metric": self.primary,
            "fingerprint": self.store.fingerprint,
            "backbone": self.store.meta.backbone.name,
            "num_seeds": len(cfg.seeds),
            "epochs_run": epochs_run,
            "trainable_parameters": trainable_parameter_count(self.model),
            "mean": {m: round(float(v.mean()), 4) for m, v in values.items()},
            "std": {m: round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4) for m, v in values.items()},
            "seeds": seeds,
            "resources": {**resources, "train_rows_in_memory": self.train_data.in_memory,
                          "read_time_s": round(self.train_data.read_seconds, 3)},
        }
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        columns = list(history[0])
        atomic_write_csv(out / "history.csv", columns, ([row.get(c, "") for c in columns] for row in history))
        (out / "predictions").mkdir(exist_ok=True)
        for name in self.eval_splits:
            split, columns = self.store.split(name), [b["predictions"][name] for b in best]
            atomic_write_csv(out / "predictions" / f"{name}.csv", ["idx", "label", *[f"seed_{s}" for s in cfg.seeds]],
                             ([int(split.ids[i]), split.labels[i].item(), *[c[i].item() for c in columns]]
                              for i in range(len(split))))
        recorded = self.store.meta.to_attrs()
        config = {"train": cfg.to_dict(), "read": self.read_config.to_dict(), "store": {
            "path": self.store.path, "fingerprint": self.store.fingerprint, "backbone": recorded["backbone"],
            "settings": recorded["identity"]["settings"], "layout": recorded["layout"]}}
        atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        remove_stale_outputs(out, cfg.seeds, self.eval_splits)
        return metrics


def train(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Stage two end to end; returns metrics.json's content."""
    return Trainer(cfg, progress=progress).run()
