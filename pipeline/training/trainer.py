"""Stage two's work: train READ side networks for several seeds in lockstep, from the store alone.

Nothing here imports transformers or touches the backbone: everything comes from the store's
arrays and attributes (label rows, family, layer layout).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.common.config import TrainConfig
from pipeline.common.errors import ConfigError, StoreCorruptError, TrainingError, mean_std, plural
from pipeline.common.files import atomic_write_csv, atomic_write_text, check_writable_folder, hold_run_folder
from pipeline.common.progress import progress_bar
from pipeline.common.resources import ResourceMeter, pick_device, set_cuda_tf32
from pipeline.common.tasks import TaskSpec, get_task
from pipeline.store import CacheStore, enclosing_store, reading_hold
from pipeline.training.adapter import (
    WRITING_MARKER,
    AdapterConfig,
    remove_stale_adapters,
    save_adapter,
    saved_seeds,
)
from pipeline.training.batches import SplitBatches
from pipeline.training.buckets import pad_tokens
from pipeline.training.checkpoint import (
    Checkpoints,
    EpochProgress,
    RunState,
    SavesWithinEpoch,
    best_scores,
    restore_optimizer,
    run_identity,
)
from pipeline.training.graphs import CudaGraphRecorder, Recorder, StepGraphs
from pipeline.training.metrics import compute_metrics, primary_metric
from pipeline.training.model import (
    ReadConfig,
    ReadModel,
    StepLoss,
    clip_grad_norm_per_seed,
    trainable_parameter_count,
)
from pipeline.training.network import SideBatch
from pipeline.training.selection import SELECTION, carve, describe

log = logging.getLogger(__name__)
FINITE_CHECK_EVERY = 64  # steps between loss checks: each is a host sync on an accelerator
NEVER = 2**62  # "no non-finite loss yet" in the per-seed first-bad-step record
# At least this many examples per evaluation batch. An evaluation batch keeps no activations, but a layer step's
# gates for every seed are alive at once: 128 examples hold less than a training step of 32 (T5-base shape, 5 seeds:
# about 0.8 against 1.2 GB), so evaluating is never a run's peak; 256 held 1.6 GB, for no gain in speed on CPU.
EVAL_BATCH_EXAMPLES = 128
SCORES_NAME = "scores.json"  # the run's headline figures, DVC's metric (``headline_scores``)


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
    if family == "encoder" and cfg.pooling == "cls" and store.meta.settings.tokens == "pooled":
        raise ConfigError(
            f"--pooling cls needs every token's states, but {store.path} is pooled (one mean state per example, "
            "no first token); use --pooling mean, or re-extract with --tokens all"
        )
    side_settings = cfg.side_settings()
    side_settings.update(pooling=cfg.pooling if family == "encoder" else "mean",
                         encoder_side=cfg.encoder_side if family == "seq2seq" else True)
    return ReadConfig(
        **side_settings, family=family, d_model=bb.d_model, num_labels=task.num_labels, task_kind=task.kind,
        has_embedding=has_embedding and layout.layers[side][0] == 0,
    )


def check_splits(task: TaskSpec, splits: list[str]) -> None:
    """A split name the task does not have says which it has (a typo is not missing data); a split of the task
    that the store lacks is refused by the store itself (``CacheStore.split``), with how to add it."""
    for name in splits:
        task.require_split(name)


def check_store(store: CacheStore, cfg: TrainConfig, task: TaskSpec, splits: list[str]) -> None:
    """Refuse what training cannot serve, before any work."""
    check_splits(task, splits)
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


def announce_replacement(out: Path, task: str) -> None:
    """Say on stderr, before training, that an earlier run in ``out`` will be replaced (its seeds' adapters too,
    also those this run does not train), and of which task when it is not ``task``: rerunning into the same folder
    replaces by design (DVC, reruns), but never silently. Printed even with --quiet: it is about the user's
    files, not progress."""
    seeds = saved_seeds(out / "adapters")
    metrics = out / "metrics.json"
    if not seeds and not metrics.is_file():
        return
    try:
        earlier = json.loads(metrics.read_text()).get("task")
    except (OSError, ValueError, AttributeError):
        earlier = None  # no readable metrics.json: the seeds say enough
    which = f"{plural(len(seeds), 'seed')} {', '.join(map(str, seeds))}" if seeds else ""
    if earlier not in (None, task):
        which = f"a run of {earlier}{', ' + which if which else ''}; this one trains {task}"
    which = f" ({which})" if which else ""
    log.info("replacing the run in %s%s", out, which)
    print(f"replacing the run in {out}{which}", file=sys.stderr)


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

    def __init__(self, cfg: TrainConfig, *, progress: bool = True, recorder: Recorder | None = None) -> None:
        """``recorder``: records whole training steps for replay (default: CUDA graphs under --cuda-graphs on a CUDA
        device, unless --compile records them its own way); the tests give a CPU stand-in."""
        self.cfg = cfg
        self.progress = progress
        self.store = CacheStore(cfg.cache)
        self.task = get_task(self.store.meta.task.name)
        self.eval_splits = list(cfg.eval_splits or self.task.validation_splits)
        if SELECTION in self.eval_splits:
            raise ConfigError(f"eval_splits: {SELECTION!r} names the split carved from {cfg.train_split}; "
                              "it is always scored")
        if cfg.train_split == self.eval_splits[0]:  # scoring it too, after the reported split, is a diagnostic
            raise ConfigError(f"split {cfg.train_split!r} is both trained on (--train-split) and reported (the first "
                              "of --eval-splits): a score on trained examples measures nothing; report another split")
        check_store(self.store, cfg, self.task, [cfg.train_split, *self.eval_splits])
        self.device = pick_device(cfg.device)
        out = cfg.out_dir(self.task.name)
        if (store := enclosing_store(out)) is not None:
            raise ConfigError(f"--out {out} is inside the store {store}, which `pipeline extract --overwrite` (and "
                              f"dvc repro) deletes whole; choose a folder outside any store, e.g. runs/{self.task.name}")
        self.out = check_writable_folder(out)  # a bad --out fails now, not after training
        for below in ("adapters", "predictions"):  # the folders the outputs go to, checked now too
            if (self.out / below).exists() and not (self.out / below).is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self.out / below))
        announce_replacement(self.out, self.task.name)
        if self.device.type == "cuda":
            set_cuda_tf32(cfg.tf32)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        label_dtype = torch.long if self.task.kind == "classification" else torch.float32

        def batches(name: str) -> SplitBatches:
            split = self.store.split(name)
            labels = torch.from_numpy(np.asarray(split.labels)).to(label_dtype)
            return SplitBatches(split, labels, memory_budget=cfg.memory_budget, shuffle_buffer=cfg.shuffle_buffer,
                                device=self.device,
                                host_budget=cfg.host_memory_budget if self.device.type != "cpu" else 0)

        whole_train = batches(cfg.train_split)  # a damaged block stops the run here, before any training
        train_ids = np.asarray(whole_train.split.ids)
        mask = carve(train_ids)
        self.selection = describe(cfg.train_split, train_ids, mask)
        self.train_data = whole_train.subset(np.flatnonzero(~mask))
        self.selection_data = whole_train.subset(np.flatnonzero(mask))
        self.eval_data = {name: batches(name) for name in self.eval_splits}
        for data in self.eval_data.values():
            data.preload()
        self.read_config = read_config_for(self.store, cfg, self.task)
        rows = self.store.label_rows()
        rows_t = torch.from_numpy(rows) if rows is not None and self.read_config.uses_label_rows else None
        self.model = ReadModel(self.read_config, list(cfg.seeds), label_rows=rows_t).to(self.device)
        # CUDA graphs: the whole eager step recorded per batch shape (pipeline.training.graphs), or under --compile
        # the compiled step in torch's reduce-overhead mode. Graphs replay fixed shapes: batches are padded to a few
        # token counts (pipeline.training.buckets).
        self.cuda_graphs = cfg.cuda_graphs and self.device.type == "cuda"
        self.recorder = recorder or (CudaGraphRecorder(self.device) if self.cuda_graphs and not cfg.compile else None)
        self.pad_tokens = self.cuda_graphs or self.recorder is not None
        self._step_graphs: tuple[torch.optim.Optimizer, StepGraphs] | None = None
        # The training forward and loss over the model's parameters, compiled or not. Dynamic shapes: one compile
        # serves every token count (and under CUDA graphs, one recording per token bucket).
        self.eager_loss = StepLoss(self.model, self.task.kind)
        self.compiled = cfg.compile
        self.step_loss = (torch.compile(self.eager_loss, dynamic=True,
                                        mode="reduce-overhead" if self.cuda_graphs else None)
                          if self.compiled else self.eager_loss)
        self.primary = primary_metric(self.task)

    def optimizer(self, epochs: int | None = None) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW and its schedule: warm-up, then linear decay to zero over ``epochs`` (default: the run's).

        On CUDA the fused AdamW updates every parameter in one kernel, not a few kernels per tensor (the
        step is launch-bound there); elsewhere torch's default implementation, so CPU runs are unchanged.
        Recorded steps (``recorder``) read the learning rate from a tensor on the device, which the schedule
        fills between steps: a float would stay in a recorded update at its value when recorded.
        """
        cfg = self.cfg
        steps = sum(self.steps_in_epoch(epoch) for epoch in range(1, (epochs or cfg.epochs) + 1))
        recorded = self.recorder is not None
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=torch.tensor(cfg.lr, device=self.device) if recorded else cfg.lr,
            weight_decay=cfg.weight_decay, fused=True if self.device.type == "cuda" or recorded else None,
            capturable=recorded and self.device.type == "cuda")
        if recorded:
            for group in optimizer.param_groups:  # the schedule's base as a float: filling the tensor never waits
                group["initial_lr"] = cfg.lr
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, cfg.warmup_ratio))

    def _epoch_seed(self, epoch: int) -> int:
        """The batch order's seed: a function of the data seed and the epoch only, so a resumed run replays it."""
        return self.cfg.data_seed * 100_003 + epoch

    def steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps in training epoch ``epoch``: more than ceil(n / batch) when the rows are streamed."""
        return self.train_data.num_batches(self.cfg.batch_size, shuffle=True, seed=self._epoch_seed(epoch))

    # ---- one epoch -----------------------------------------------------------------------------
    def train_epoch(self, epoch: int, optimizer: torch.optim.Optimizer, scheduler: Any,
                    phase: Callable[[str], None] | None = None, *, done: EpochProgress | None = None,
                    saves: SavesWithinEpoch | None = None) -> np.ndarray:
        """One pass over the training split; the mean loss per seed (S,).

        Losses are summed on the device and checked for finiteness every ``FINITE_CHECK_EVERY`` steps
        and at the end (a host sync each time, not every step); a non-finite loss names the seed(s)
        whose loss first went non-finite, as a check every step would. ``phase``, when given, is called
        as each part of a step ends ("batch", "forward", "backward", "step"; a recorded step is one part,
        "step"), so a benchmark can time the parts of this very loop. ``done``: the part of this epoch a
        resumed run trained before (its batches are skipped). ``saves``: how the run is saved after a step
        when a save is due, the losses so far checked finite first.
        """
        mark = phase or (lambda _: None)
        self.model.train()
        S = len(self.cfg.seeds)
        skip = 0 if done is None else done.steps
        sums = [0.0] * S if done is None else done.loss_sums
        totals = torch.tensor(sums, dtype=torch.float64, device=self.device)
        first_bad = torch.full((S,), NEVER, dtype=torch.long, device=self.device)
        count = 0 if done is None else done.examples
        batches = self.train_data.epoch(self.cfg.batch_size, shuffle=True, seed=self._epoch_seed(epoch), skip=skip)
        steps = self.steps_in_epoch(epoch)
        graphs = self._graphs_for(optimizer) if self.recorder is not None else None
        bar = progress_bar(batches, total=steps, initial=skip, desc=f"epoch {epoch}", unit="batch",
                           enabled=self.progress, leave=False)
        for step, (_, batch) in enumerate(bar, start=skip):
            batch = batch.to(self.device, non_blocking=True)
            mark("batch")
            if graphs is not None:
                with self._compiled_step_errors():
                    losses = self._recorded_step(graphs, batch)
            else:
                with self._compiled_step_errors():
                    losses = self._losses(batch)  # (S,)
                mark("forward")
                with self._compiled_step_errors():
                    losses.sum().backward()  # seeds share no parameters: each gets its own gradient
                mark("backward")
                clip_grad_norm_per_seed(self.model, self.cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            mark("step")
            first_bad = torch.where(~torch.isfinite(losses) & (first_bad == NEVER), step, first_bad)
            if (step + 1) % FINITE_CHECK_EVERY == 0:
                self._check_finite(first_bad, epoch)
            totals += losses.detach().double() * batch.num_examples
            count += batch.num_examples
            if saves is not None and step + 1 < steps and saves.due():
                self._check_finite(first_bad, epoch)  # a checkpoint holds finite weights only
                saves.save(EpochProgress(step + 1, totals.tolist(), count))
        self._check_finite(first_bad, epoch)
        return totals.cpu().numpy() / max(count, 1)

    def _graphs_for(self, optimizer: torch.optim.Optimizer) -> StepGraphs:
        """The recorded steps that update through ``optimizer``: kept from epoch to epoch, new for a new optimizer."""
        if self._step_graphs is None or self._step_graphs[0] is not optimizer:
            assert self.recorder is not None
            self._step_graphs = optimizer, StepGraphs(partial(self._whole_step, optimizer), self.recorder)
        return self._step_graphs[1]

    def _whole_step(self, optimizer: torch.optim.Optimizer, batch: SideBatch,
                    masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Everything a recorded step does, the per-seed losses out: the gradients are zeroed in place (not set
        to None), so that every recording and every eager step accumulates into the same tensors."""
        optimizer.zero_grad(set_to_none=False)
        losses = self.eager_loss(batch, masks)
        losses.sum().backward()
        clip_grad_norm_per_seed(self.model, self.cfg.max_grad_norm)
        with warnings.catch_warnings():  # a capturable AdamW warns when a step runs unrecorded, as some must
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            optimizer.step()
        return losses

    def _recorded_step(self, graphs: StepGraphs, batch: SideBatch) -> torch.Tensor:
        """One whole step through ``graphs``: replayed for a full batch, padded to its token bucket; eager for a
        smaller one (an epoch's last), whose shape would need recordings of its own."""
        masks = self.model.dropout_masks(batch)
        if batch.num_examples != self.cfg.batch_size:
            return graphs.eager(batch, masks)
        return graphs(*pad_tokens(batch, masks))

    def _losses(self, batch: SideBatch) -> torch.Tensor:
        """The training forward and per-seed losses: compiled under --compile, padded and replayed under --cuda-graphs.

        A smaller batch (an epoch's last; streamed, each chunk's last) runs eagerly: its example count would cost
        a second compile (a batch of one example always does) and, under CUDA graphs, recordings of its own.
        """
        masks = self.model.dropout_masks(batch)  # eagerly, so that a compiled forward is one graph
        if batch.num_examples != self.cfg.batch_size:
            return self.eager_loss(batch, masks)
        if self.pad_tokens:  # after the masks: the seeds draw what they draw unpadded
            batch, masks = pad_tokens(batch, masks)
        if self.cuda_graphs:  # a new step: the previous step's graph outputs are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        return self.step_loss(batch, masks)

    @contextmanager
    def _compiled_step_errors(self) -> Iterator[None]:
        """A compiled step's failure as one line that names the way out: a compiler that cannot build the step,
        or (--cuda-graphs) a graph that cannot be recorded or replayed. Out of memory, and every eager error,
        pass as they are."""
        try:
            yield
        except torch._dynamo.exc.BackendCompilerFailed as error:
            raise TrainingError(f"--compile failed: torch.compile could not build the step ({_first_line(error)}); "
                                "train without --compile or --cuda-graphs (same results, eager speed)") from error
        except Exception as error:
            if not self.cuda_graphs or isinstance(error, (torch.cuda.OutOfMemoryError, TrainingError)):
                raise
            raise TrainingError(f"--cuda-graphs failed: the step could not run as CUDA graphs ({_first_line(error)}); "
                                "train without --cuda-graphs (--compile alone or eager: same results)") from error

    def _check_finite(self, first_bad: torch.Tensor, epoch: int) -> None:
        """Raise if a seed's loss went non-finite: the seeds of the earliest such step."""
        steps = first_bad.tolist()
        earliest = min(steps)
        if earliest != NEVER:
            bad = [s for s, at in zip(self.cfg.seeds, steps) if at == earliest]
            raise TrainingError(
                f"non-finite training loss at epoch {epoch} for seed(s) {bad}; lower --lr or check the store "
                "with `pipeline verify`"
            )

    @property
    def eval_batch_size(self) -> int:
        """Examples per evaluation batch: no gradients are kept, so larger than training's (``EVAL_BATCH_EXAMPLES``)."""
        return max(self.cfg.batch_size, EVAL_BATCH_EXAMPLES)

    @torch.no_grad()
    def predict(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Predictions (S, n) in split order, and the labels (n,), of an eval split or of ``selection``."""
        self.model.eval()
        data = self.selection_data if name == SELECTION else self.eval_data[name]
        preds = np.zeros((len(self.cfg.seeds), len(data)),
                         dtype=np.float32 if self.task.kind == "regression" else np.int64)
        indices, values = [], []  # kept on the device until the end: one transfer, no sync per batch
        for index, batch in data.epoch(self.eval_batch_size, shuffle=False):
            out = self.model(batch.to(self.device, non_blocking=True))
            indices.append(index)
            values.append(out if self.task.kind == "regression" else out.argmax(-1))
        if values:
            preds[:, data.positions(np.concatenate(indices))] = torch.cat(values, dim=1).cpu().numpy()
        return preds, data.example_labels()

    def evaluate(self) -> tuple[list[dict[str, float]], dict[str, np.ndarray]]:
        """Every seed's metrics on the selection and eval splits (the first eval split unprefixed), and the
        eval splits' predictions (S, n)."""
        per_seed: list[dict[str, float]] = [{} for _ in self.cfg.seeds]
        predictions = {}
        for name in [SELECTION, *self.eval_splits]:
            preds, labels = self.predict(name)
            if name != SELECTION:
                predictions[name] = preds
            prefix = "" if name == self.eval_splits[0] else f"{name}/"
            for k, metrics in enumerate(per_seed):
                metrics.update({prefix + m: v for m, v in compute_metrics(self.task, preds[k], labels).items()})
        return per_seed, predictions

    @property
    def select_key(self) -> str:
        """The metric that chooses: the primary metric on the selection split, or on validation if asked."""
        return f"{SELECTION}/{self.primary}" if self.cfg.select_on == SELECTION else self.primary

    def frozen_start(self, per_seed: list[dict[str, float]]) -> dict[str, Any]:
        """Epoch 0: the scores before any step, and what they mean for this family and head."""
        cfg = self.read_config
        if cfg.uses_label_rows and (cfg.method == "probe" or cfg.out_init == "zeros"):
            meaning = ("zero-shot: the backbone's own prediction through the label words' LM-head rows "
                       "(the side network starts at zero and changes nothing)")
        elif cfg.uses_label_rows:
            meaning = ("the backbone's prediction through the label words' LM-head rows plus an untrained, randomly "
                       "initialised correction (out_init=linear): not the zero-shot score")
        else:
            meaning = ("a fresh, randomly initialised head on the frozen backbone's final state: chance level, "
                       "not a zero-shot score")
        names = list(per_seed[0])
        return {"epoch": 0, "meaning": meaning,
                "mean": {m: round(float(np.mean([p[m] for p in per_seed])), 4) for m in names},
                "seeds": {str(s): {m: round(v, 4) for m, v in p.items()} for s, p in zip(self.cfg.seeds, per_seed)}}

    def majority_baseline(self) -> dict[str, float]:
        """The first eval split scored by a constant: the training majority class, or the mean training score."""
        train = self.train_data.example_labels()
        labels = self.eval_data[self.eval_splits[0]].example_labels()
        if self.task.kind == "classification":
            constant = np.full(len(labels), np.bincount(train.astype(np.int64)).argmax())
        else:
            constant = np.full(len(labels), float(np.mean(train)), dtype=np.float32)
        return {m: round(v, 4) for m, v in compute_metrics(self.task, constant, labels).items()}

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train every seed; keep each seed's epoch chosen by ``select_key`` (never the reported split by default).

        Between steps the run's state is saved (``checkpoint_seconds``); a run that finds its own checkpoint
        (same store and settings) goes on from it and writes what an uninterrupted run writes."""
        folder = hold_run_folder(self.out)  # one run at a time writes a folder: its checkpoint and outputs
        try:
            return self._run()
        finally:
            folder.release()

    def _run(self) -> dict[str, Any]:
        """``run`` under the folder's lock: from the frozen start, or from the checkpoint it finds."""
        cfg, S = self.cfg, len(self.cfg.seeds)
        optimizer, scheduler = self.optimizer()
        checkpoints = Checkpoints(self.out, run_identity(cfg, self.store.fingerprint, self.device,
                                                         streamed=not self.train_data.in_memory,
                                                         eval_splits=self.eval_splits),
                                  cfg.checkpoint_seconds)
        resumed, note = checkpoints.load() if cfg.resume else (None, checkpoints.skip())
        if note:
            self._note(note, always=True)
        best_score, waited, best = best_scores(resumed, S)
        with ResourceMeter(self.device) as meter:
            if resumed is None:
                start, _ = self.evaluate()  # epoch 0: the untrained side network leaves the backbone's prediction
                frozen = self.frozen_start(start)
                history: list[dict[str, Any]] = [self._history_row(0, None, start)]
                self._say(0, None, start)
            else:
                frozen, history = resumed.frozen, resumed.history
                self.model.load_state_dict(resumed.model)
                self.model.load_dropout_state(resumed.dropout)
                restore_optimizer(optimizer, resumed.optimizer)
                scheduler.load_state_dict(resumed.scheduler)
            if cfg.cuda_graphs and not self.cuda_graphs:
                self._note(f"--cuda-graphs: no CUDA device ({self.device}), so no graphs"
                           + ("; the step is compiled" if cfg.compile else "; eager steps"), always=True)
            if self.compiled:  # the first step is silent for a while: say why
                self._note("--compile: the first steps build the compiled step (about a minute, once per run)")
            def state_at(epoch: int, within: EpochProgress | None = None) -> RunState:
                """The run as it stands after ``epoch`` epochs (and ``within`` the next one)."""
                return RunState(
                    epoch=epoch, model=self.model.state_dict(), optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(), dropout=self.model.dropout_state(),
                    best_score=best_score.tolist(), waited=waited.tolist(), best=best, history=history,
                    frozen=frozen, wall_time_s=meter.elapsed() + (resumed.wall_time_s if resumed else 0.0),
                    within=within)

            epoch = first = 1 if resumed is None else resumed.epoch + 1
            for epoch in range(first, cfg.epochs + 1):
                done = resumed.within if resumed is not None and epoch == first else None
                saves = SavesWithinEpoch(checkpoints, partial(state_at, epoch - 1))
                train_loss = self.train_epoch(epoch, optimizer, scheduler, done=done, saves=saves)
                per_seed, predictions = self.evaluate()
                for k in range(S):
                    if cfg.patience is not None and waited[k] >= cfg.patience:
                        continue  # this seed's best is final, as if it had stopped alone; the others go on
                    score = per_seed[k][self.select_key]
                    if score > best_score[k]:
                        best_score[k], waited[k] = score, 0
                        best[k] = {"epoch": epoch, "metrics": per_seed[k], "state": self.model.seed_state_dict(k),
                                   "predictions": {n: p[k].copy() for n, p in predictions.items()}}
                    else:
                        waited[k] += 1
                history.append(self._history_row(epoch, train_loss, per_seed))
                stop = cfg.patience is not None and (waited >= cfg.patience).all()
                if not stop and epoch < cfg.epochs and checkpoints.due():  # saved before said: a line seen is kept
                    checkpoints.save(state_at(epoch))
                self._say(epoch, train_loss, per_seed)
                if stop:
                    break
        for k in range(S):
            self.model.load_seed_state_dict(k, best[k]["state"])
        resources = meter.summary()
        if resumed is not None:
            resources.update(resumed_after_epoch=resumed.epoch, earlier_wall_time_s=round(resumed.wall_time_s, 3))
            if resumed.within is not None:
                resources.update(resumed_after_batches=resumed.within.steps)
        metrics = self._write_outputs(best, history, resources, epochs_run=epoch, record=self._selection_record(frozen))
        checkpoints.remove()
        return metrics

    def _note(self, note: str, always: bool = False) -> None:
        """A line on stderr (``always``: even without progress, as it is about the user's files or a flag not
        obeyed) and in the log."""
        log.info(note)
        if self.progress or always:
            print(note, file=sys.stderr)

    def _say(self, epoch: int, train_loss: np.ndarray | None, per_seed: list[dict[str, float]]) -> None:
        loss = "frozen start" if train_loss is None else f"loss {train_loss.mean():.4f}"
        scores = (f"{self.select_key} " + " ".join(f"{m[self.select_key]:.2f}" for m in per_seed)
                  + (f"  {self.primary} " + " ".join(f"{m[self.primary]:.2f}" for m in per_seed)
                     if self.select_key != self.primary else ""))
        log.info("epoch %d: %s, %s", epoch, loss, scores)
        if self.progress:
            print(f"epoch {epoch}/{self.cfg.epochs}  {loss}  {scores}", file=sys.stderr)

    def _history_row(self, epoch: int, train_loss: np.ndarray | None,
                     per_seed: list[dict[str, float]]) -> dict[str, Any]:
        # "primary": the validation metric under one name for every task, so dvc plots can chart it;
        # "select_on" says which split's scores chose the epoch (validation: optimistic).
        row: dict[str, Any] = {"epoch": epoch,
                               "train_loss": "" if train_loss is None else round(float(train_loss.mean()), 6),
                               "select_on": self.cfg.select_on,
                               "primary": round(float(np.mean([m[self.primary] for m in per_seed])), 4)}
        for metric in per_seed[0]:
            row[metric] = round(float(np.mean([m[metric] for m in per_seed])), 4)
        for seed, metrics in zip(self.cfg.seeds, per_seed):
            row[f"{self.primary}_seed{seed}"] = round(metrics[self.primary], 4)
            row[f"{SELECTION}/{self.primary}_seed{seed}"] = round(metrics[f"{SELECTION}/{self.primary}"], 4)
        return row

    def _selection_record(self, frozen: dict[str, Any]) -> dict[str, Any]:
        """metrics.json's account of how the epochs were chosen, and of the frozen start and the majority rate."""
        honest = self.cfg.select_on == SELECTION
        return {
            "select_on": self.cfg.select_on,
            "select_metric": self.select_key,
            "selected_on": (f"the {SELECTION} split (carved from {self.cfg.train_split}; the reported validation "
                            "scores chose nothing)" if honest else
                            "VALIDATION: the reported split itself chose each seed's epoch (optimistic)"),
            SELECTION: self.selection,
            "frozen_start": frozen,
            "majority_baseline": self.majority_baseline(),
        }

    def _write_outputs(self, best: list[dict[str, Any]], history: list[dict[str, Any]],
                       resources: dict[str, Any], epochs_run: int, record: dict[str, Any]) -> dict[str, Any]:
        cfg, out = self.cfg, self.out
        out.mkdir(parents=True, exist_ok=True)
        # metrics.json marks a finished run: it goes first and comes back last, so a run stopped while it writes
        # its files (over an earlier run's) leaves no folder that reads as finished with two runs' files in it.
        for name in ("metrics.json", SCORES_NAME):
            (out / name).unlink(missing_ok=True)
        marker = out / "adapters" / WRITING_MARKER
        marker.parent.mkdir(exist_ok=True)
        atomic_write_text(marker, "pipeline train is writing this run's outputs; metrics.json comes last\n")
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
            # The sample std; none for one seed, whose spread is unknown (not 0).
            "std": {m: round(float(v.std(ddof=1)), 4) if len(v) > 1 else None for m, v in values.items()},
            "seeds": seeds,
            "resources": {**resources, "train_rows_in_memory": self.train_data.in_memory,
                          "read_time_s": round(self.train_data.read_seconds, 3)},
            **record,
        }
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
        atomic_write_text(out / SCORES_NAME, json.dumps(headline_scores(metrics), indent=2) + "\n")
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        marker.unlink()
        return metrics


def _first_line(error: BaseException) -> str:
    """The root cause of a compiler or CUDA graph failure, in one line."""
    return (str(error.__cause__ or error).strip().splitlines() or [type(error).__name__])[0]


def headline_scores(metrics: dict[str, Any]) -> dict[str, Any]:
    """scores.json: the few figures of a run that `dvc metrics show` and `dvc exp show` tabulate, flat and under the
    same names for every task (metrics.json has them all: per seed, per metric, resources; DVC would make a column
    of each, thousands of characters wide)."""
    primary, select = metrics["primary_metric"], metrics["select_metric"]
    return {"task": metrics["task"], "primary_metric": primary,
            "primary": metrics["mean"][primary], "primary_std": metrics["std"][primary],
            "select_on": metrics["select_on"], "selection": metrics["mean"][select],
            "frozen_start": metrics["frozen_start"]["mean"][primary],
            "majority": metrics["majority_baseline"][primary],
            "seeds": metrics["num_seeds"], "epochs_run": metrics["epochs_run"]}


def result_line(metrics: dict[str, Any]) -> str:
    """The one line `pipeline train` and the DVC stage print: validation scores, how the epochs were chosen,
    and what they started from."""
    mean, std, primary = metrics["mean"], metrics["std"], metrics["primary_metric"]
    shown = ", ".join(f"{m} {mean_std(mean[m], std[m])}" for m in mean if "/" not in m)
    chosen = ("epochs chosen on the selection split" if metrics["select_on"] == SELECTION
              else "epochs chosen ON VALIDATION (optimistic)")
    seeds = f"{metrics['num_seeds']} {plural(metrics['num_seeds'], 'seed')}"
    return (f"{metrics['task']} ({metrics['method']}, {seeds}): {shown}; {chosen}; "
            f"frozen start {metrics['frozen_start']['mean'][primary]:.2f}, "
            f"majority {metrics['majority_baseline'][primary]:.2f}")


def train(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Stage two end to end; returns metrics.json's content.

    The store is held for reading from the moment it is opened to the last output written: an extraction that
    would replace it (``--overwrite``, other settings under ``dvc repro``) refuses meanwhile.
    """
    with reading_hold(cfg.cache), _torch_settings_kept():
        return Trainer(cfg, progress=progress).run()


@contextlib.contextmanager
def _torch_settings_kept() -> Iterator[None]:
    """The process-wide torch settings a run sets (``threads``, ``tf32``) as the caller had them afterwards: a
    notebook's later work, or a sweep's next point in the same worker, must not inherit them."""
    threads = torch.get_num_threads()
    try:
        tf32: bool | None = torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:  # the caller set the newer fp32_precision API, which the legacy flag may not be read beside
        tf32 = None
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if tf32 is not None and torch.cuda.is_available():
            set_cuda_tf32(tf32)
