"""Trained adapters on live text: one frozen forward per batch, the states turned into exactly the rows
the store would hold, and every adapter's side network on them.

Parity with stage two is the point: the side network was trained on stored rows (the kept layers, every
token or the pooled mean, rounded to the storage dtype), so the live states go through the same
``StateSink`` into the stored representation and the same ``Chunk.batch`` into a ``SideBatch``. The
backbone is loaded as the extraction loaded it (same dtype: bfloat16 autocast on CUDA), and refused
when its content hash differs from the one the adapter was trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.common.errors import AdapterError, AdapterNotFoundError, ConfigError, ModelLoadError
from pipeline.common.progress import progress_bar
from pipeline.common.tasks import TaskSpec, get_task
from pipeline.extraction.backbones import Backbone, Encoded, load_backbone
from pipeline.extraction.stage import StateSink, into_sinks, length_batches
from pipeline.inference.texts import check_examples
from pipeline.store import STORED_DTYPES
from pipeline.store.format import torch_dtype, torch_view
from pipeline.training.adapter import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    WRITING_MARKER,
    AdapterConfig,
    ExtractionSettings,
    load_adapter,
)
from pipeline.training.batches import Chunk
from pipeline.training.model import ReadModel
from pipeline.training.network import SideBatch

log = logging.getLogger(__name__)
PREDICT_WINDOW = 8192  # examples tokenized and batched together (about 4 KB of token ids each on the host)


@dataclass
class LoadedAdapter:
    """One trained seed: where it lives, the name its outputs carry, its network and its record."""

    path: Path
    name: str
    model: ReadModel
    config: AdapterConfig


def find_adapters(paths: Sequence[str | Path]) -> list[Path]:
    """Adapter folders: each path is one (it holds adapter files) or a run folder meaning every seed."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / ADAPTER_CONFIG_NAME).exists() or (path / ADAPTER_WEIGHTS_NAME).exists():
            found.append(_finished(path))
            continue
        seeds = [p for p in sorted((path / "adapters").glob("seed_*")) or sorted(path.glob("seed_*")) if p.is_dir()]
        if not seeds:
            what = "does not exist" if not path.exists() else "holds no adapter"
            raise AdapterNotFoundError(
                f"adapter {path} {what}: expected an adapter folder ({ADAPTER_CONFIG_NAME} + {ADAPTER_WEIGHTS_NAME}) "
                "or a run folder with adapters/seed_<k>/ (as `pipeline train` writes them)"
            )
        found.extend(_finished(seed) for seed in sorted(seeds, key=_seed_order))
    seen: set[Path] = set()
    unique = []
    for path in found:  # a seed named twice (a run folder and one of its seeds) runs once
        if path.resolve() not in seen:
            seen.add(path.resolve())
            unique.append(path)
    return unique


def _finished(adapter: Path) -> Path:
    """``adapter``, unless the run that holds it is still writing its outputs or was stopped while it did
    (`pipeline train` marks its adapters/ until metrics.json is written): then the adapters beside it may be of
    two runs."""
    marker = adapter.resolve().parent / WRITING_MARKER
    if marker.is_file():
        run = marker.parent.parent
        raise AdapterNotFoundError(
            f"{run} is an unfinished run (its {marker.relative_to(run)} is there: its outputs were not all written, "
            "so its adapters may be of two runs); rerun its `pipeline train` command to finish it"
        )
    return adapter


def _seed_order(path: Path) -> tuple[int, int, str]:
    """seed_2 before seed_10; other names after, alphabetically."""
    suffix = path.name.removeprefix("seed_")
    return (0, int(suffix), "") if suffix.isdigit() else (1, 0, path.name)


def load_adapters(paths: Sequence[str | Path], *, task: str | None = None) -> list[LoadedAdapter]:
    """Load every adapter and check they can share one forward pass and serve ``task``."""
    folders = find_adapters(paths)
    loaded = [(folder, *load_adapter(folder)) for folder in folders]
    names = [folder.name for folder in folders]
    if len(set(names)) < len(names):  # seed_0 of two runs: tell them apart by path
        names = [str(folder) for folder in folders]
    adapters = [LoadedAdapter(folder, name, model, config) for (folder, model, config), name in zip(loaded, names)]
    first = adapters[0]
    if task is not None:
        wanted = get_task(task).name
        for a in adapters:
            if a.config.task != wanted:
                raise AdapterError(f"--task {wanted} does not match adapter {a.path}, trained on {a.config.task}")
    for a in adapters:
        if a.config.extraction is None:
            raise AdapterError(
                f"{a.path / ADAPTER_CONFIG_NAME} predates the extraction record (layers, tokens, dtype, max_length) "
                "that predict needs to rebuild its inputs; retrain it with this version (`pipeline train`)"
            )
        for field in ("task", "revision", "extraction"):
            if getattr(a.config, field) != getattr(first.config, field):
                raise AdapterError(
                    f"adapters {first.path} and {a.path} differ in {field} ({getattr(first.config, field)} vs "
                    f"{getattr(a.config, field)}): one forward pass cannot serve both; predict them separately"
                )
    return adapters


def check_batch_tokens(batch_tokens: int, config: AdapterConfig) -> None:
    """Refuse a ``batch_tokens`` below the max_length the adapters' extraction used, as `pipeline extract` refuses
    it: a batch must hold the longest example. Refused rather than quietly raised to max_length, so the option
    means the same in both commands (and a batch never holds more tokens than asked for)."""
    if batch_tokens < 1:
        raise ConfigError(f"--batch-tokens must be positive, got {batch_tokens}")
    max_length = config.extraction.max_length if config.extraction is not None else 1
    if batch_tokens < max_length:
        raise ConfigError(
            f"--batch-tokens {batch_tokens} must be at least max_length ({max_length}, the adapters' extraction "
            f"setting) so the longest example fits in a batch; pass --batch-tokens {max_length} or more"
        )


@dataclass
class Predictions:
    """Raw outputs of every adapter on n examples: logits (A, n, K), or scores (A, n) for regression."""

    task: TaskSpec
    names: list[str]
    outputs: np.ndarray
    cut: int = 0  # examples cut to fit max_length tokens, as in training

    def heads(self, *, ensemble: bool) -> list[Head]:
        """One prediction column per adapter, or one for their ensemble (mean probabilities or scores)."""
        if self.task.kind == "regression":
            scores = self.outputs.mean(0, keepdims=True) if ensemble else self.outputs
            return [Head(name, s, None) for name, s in zip(self._names(ensemble), scores)]
        shifted = self.outputs - self.outputs.max(-1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
        if ensemble:
            probs = probs.mean(0, keepdims=True)
        return [Head(name, p.argmax(-1), p) for name, p in zip(self._names(ensemble), probs)]

    def _names(self, ensemble: bool) -> list[str]:
        return ["ensemble"] if ensemble else list(self.names)


@dataclass
class Head:
    """What one adapter (or the ensemble) predicts: class indices or scores, and class probabilities."""

    name: str
    values: np.ndarray  # (n,) int class index, or float score
    probabilities: np.ndarray | None  # (n, K); None for regression


class Predictor:
    """A loaded backbone and the adapters it feeds; seeds of one configuration run stacked in lockstep."""

    def __init__(self, backbone: Backbone, adapters: Sequence[LoadedAdapter]) -> None:
        if not adapters:
            raise ConfigError("predict needs at least one adapter")
        self.backbone = backbone
        self.adapters = list(adapters)
        config = self.adapters[0].config
        assert config.extraction is not None  # load_adapters refuses adapters without it
        self.extraction: ExtractionSettings = config.extraction
        self.task = get_task(config.task)
        self._check_backbone()
        self.groups = self._stack()

    def _check_backbone(self) -> None:
        bb, first = self.backbone, self.adapters[0]
        cfg, ext = first.config, self.extraction
        if cfg.revision != bb.revision:
            raise AdapterError(
                f"backbone {bb.name} has revision {bb.revision}, but adapter {first.path} was trained on "
                f"{cfg.base_model_name_or_path} at revision {cfg.revision}; its side network only fits those "
                "weights (pass --model with them)"
            )
        if cfg.revision == "unknown":
            log.warning("%s: the backbone's revision is unknown; it cannot be checked against the adapter", bb.name)
        if (bb.family, bb.d_model) != (cfg.read.family, cfg.read.d_model):
            raise AdapterError(
                f"backbone {bb.name} is a {bb.family} model (d={bb.d_model}, template {bb.template}); adapter "
                f"{first.path} needs {cfg.read.family} (d={cfg.read.d_model}, template {ext.template})"
            )
        if not bb.makes(ext.template):
            raise AdapterError(
                f"adapter {first.path} was trained on inputs made as {ext.template!r}, which this version no longer "
                f"makes ({bb.name}'s are {bb.template!r}); extract its store again with this version and retrain"
            )
        states = {"encoder": bb.n_layers_encoder, "decoder": bb.n_layers_decoder}
        for side, kept in ext.layers.items():
            if not states.get(side) or max(kept) >= states[side]:
                raise AdapterError(f"adapter {first.path} reads {side} states {list(kept)}; {bb.name} has "
                                   f"{states.get(side, 0)} on that side")
        rows = bb.label_rows(self.task) if cfg.read.uses_label_rows else None
        for a in self.adapters:
            saved = a.model.label_rows
            if rows is not None and (saved is None or not torch.allclose(saved, torch.from_numpy(rows), atol=1e-5)):
                raise AdapterError(f"the LM-head rows of {self.task.name}'s label words in {bb.name} differ from those "
                                   f"adapter {a.path} was trained with")

    def _stack(self) -> list[tuple[ReadModel, list[int]]]:
        """One model per side-network configuration, its seeds stacked (one batched pass serves them all)."""
        members: list[list[int]] = []
        for i, a in enumerate(self.adapters):
            for group in members:
                head = self.adapters[group[0]]
                same_rows = (head.model.label_rows is None and a.model.label_rows is None) or (
                    head.model.label_rows is not None and a.model.label_rows is not None
                    and torch.equal(head.model.label_rows, a.model.label_rows))
                seeds = {self.adapters[j].config.seed for j in group}
                if head.config.read == a.config.read and same_rows and a.config.seed not in seeds:
                    group.append(i)
                    break
            else:
                members.append([i])
        groups = []
        for group in members:
            head = self.adapters[group[0]]
            model = ReadModel(head.config.read, [self.adapters[j].config.seed for j in group],
                              label_rows=head.model.label_rows)
            for k, j in enumerate(group):
                model.load_seed_state_dict(k, self.adapters[j].model.seed_state_dict(0))
            groups.append((model.eval().to(self.backbone.device), group))
        return groups

    @classmethod
    def load(cls, adapters: Sequence[LoadedAdapter], *, model: str | None = None, device: str = "auto") -> Predictor:
        """Load the backbone the adapters name (or ``model``) as their extraction did, and check it.

        The name an adapter records is the one `pipeline extract --model` was given (a relative folder is read from
        the current folder), so when it does not load here the message says how to point at the backbone instead.
        """
        cfg = adapters[0].config
        assert cfg.extraction is not None
        try:
            backbone = load_backbone(model or cfg.base_model_name_or_path, dtype=cfg.extraction.dtype, device=device)
        except ModelLoadError as exc:
            if model is not None:
                raise
            raise ModelLoadError(
                f"{exc}; adapter {adapters[0].path} names its backbone as `pipeline extract --model` was given it: "
                "pass --model with the backbone's folder"
            ) from exc
        return cls(backbone, adapters)

    # ---- the live path -----------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[dict[str, str]]) -> list[list[int]]:
        return self.encode(texts).ids

    def encode(self, texts: Sequence[dict[str, str]]) -> Encoded:
        """Token ids as the adapters' extraction made them (its template and max_length), and which were cut."""
        return self.backbone.encode(self.task, texts, self.extraction.max_length, template=self.extraction.template)

    def side_batch(self, batch_ids: Sequence[Sequence[int]], *, on_device: bool | None = None) -> SideBatch:
        """A forward pass's states as the store would hold them, batched as training batches them.

        Each state's kept rows go into the batch's buffers as the forward makes it (``Backbone.forward``'s
        ``take``), as extraction's do into a block. On an accelerator (``on_device``; by default where the backbone
        is) the buffers are on the device, so the states never cross to host memory and back; on a CPU, numpy
        arrays.
        """
        ext, bb = self.extraction, self.backbone
        on_device = bb.device.type != "cpu" if on_device is None else on_device
        lengths = bb.state_lengths(batch_ids)
        buffers: dict[str, np.ndarray | torch.Tensor] = {}
        sinks, counts = {}, {}
        for side, kept in ext.layers.items():
            rows = np.asarray(lengths[side] if ext.per_token(side) else [1] * len(batch_ids), dtype=np.int64)
            shape = (int(rows.sum()), len(kept), bb.d_model)
            buffers[side] = (torch.zeros(shape, dtype=torch_dtype(ext.dtype), device=bb.device) if on_device
                             else np.zeros(shape, dtype=STORED_DTYPES[ext.dtype]))
            starts = np.concatenate([[0], np.cumsum(rows)[:-1]])
            sinks[side] = StateSink(buffers[side], ext.dtype, lengths[side], starts, pooled=not ext.per_token(side))
            counts[side] = rows
        bb.forward(batch_ids, into_sinks(sinks, ext.layers))
        states = {side: b if isinstance(b, torch.Tensor) else torch_view(b, ext.dtype) for side, b in buffers.items()}
        examples = np.arange(len(batch_ids))
        labels = torch.zeros(len(batch_ids), device=bb.device if on_device else "cpu")
        return Chunk.from_rows(examples, labels, states, counts).batch(examples)

    @torch.inference_mode()
    def predict_batch(self, batch_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Outputs of every adapter for one batch: (A, B, K) logits or (A, B) scores, float32."""
        batch = self.side_batch(batch_ids).to(self.backbone.device)
        results: list[np.ndarray | None] = [None] * len(self.adapters)
        for model, group in self.groups:
            values = model(batch).float().cpu().numpy()  # (S, B, ...)
            for k, j in enumerate(group):
                results[j] = values[k]
        return np.stack(results)  # type: ignore[arg-type]

    def predict(self, texts: Sequence[dict[str, str]], *, batch_tokens: int = 16384,
                progress: bool = True) -> Predictions:
        """Every adapter's outputs on ``texts``, in their order; batches formed by length within windows of
        ``PREDICT_WINDOW`` examples, so that the token ids held (and the tokenizer's working memory) stay bounded
        however long the input."""
        check_batch_tokens(batch_tokens, self.adapters[0].config)
        check_examples(texts, self.task)
        width = (self.task.num_labels,) if self.task.kind == "classification" else ()
        outputs = np.zeros((len(self.adapters), len(texts), *width), dtype=np.float32)
        cut = 0
        bar = progress_bar(total=len(texts), desc=f"predict {self.task.name}", unit="ex", enabled=progress)
        for start in range(0, len(texts), PREDICT_WINDOW):
            encoded = self.encode(texts[start : start + PREDICT_WINDOW])
            token_ids = encoded.ids
            cut += sum(encoded.cut)
            for batch in length_batches([len(t) for t in token_ids], batch_tokens):
                outputs[:, [start + i for i in batch]] = self.predict_batch([token_ids[i] for i in batch])
                bar.update(len(batch))
        bar.close()
        return Predictions(self.task, [a.name for a in self.adapters], outputs, cut)
