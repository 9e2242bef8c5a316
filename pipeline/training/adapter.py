"""A trained seed as a PEFT-style adapter: the typed record of adapter_config.json, saved and loaded whole.

The side network only makes sense on the exact states it was trained on, so the record carries, besides
the ``ReadConfig`` and the seed, what produced those states: the backbone and its revision (content
hash), the store's fingerprint, the task, and the extraction settings the network depends on (layers
kept per side, every token or pooled, storage dtype, max_length, input template). ``pipeline predict``
rebuilds the same states from live text with them. The JSON is flat like PEFT's (the ReadConfig fields,
``seed``, ``peft_type``, ``base_model_name_or_path``, ``revision``, ...) with ``extraction`` nested.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.common.config import DTYPES
from pipeline.common.errors import AdapterError, AdapterNotFoundError, ConfigError
from pipeline.common.files import atomic_write_bytes, atomic_write_text, partial_path
from pipeline.common.tasks import get_task
from pipeline.store import SIDES, StoreMeta
from pipeline.store.format import keeps_every_token
from pipeline.training.model import ReadConfig, ReadModel

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# In a run's adapters/ while `pipeline train` replaces them, until its metrics.json is written: adapters beside it
# may be of two runs (one stopped while writing over the other). Its absence is what "finished" means to predict,
# whatever path names the adapters, and a copy of a finished run's adapters/ (dvc get) has none.
WRITING_MARKER = ".writing"
PEFT_TYPE = "READ"
_PROVENANCE = ("base_model_name_or_path", "revision", "store_fingerprint", "task")


@dataclass(frozen=True)
class ExtractionSettings:
    """How the backbone's states were turned into the rows the side network was trained on."""

    layers: Mapping[str, tuple[int, ...]]  # side -> kept state indices (0 = embedding output)
    tokens: str  # "all": every token's row; "pooled": per layer the mean over the example's tokens
    dtype: str  # storage dtype: states were rounded to it (bfloat16, float16, float32)
    max_length: int  # tokens per example after truncation
    template: str  # input formatting, as the store names it: t5, t5+answer/in-context/longest-first (decoder), pair+segments (encoder)

    def __post_init__(self) -> None:
        layers = {str(side): tuple(int(i) for i in kept) for side, kept in dict(self.layers).items()}
        object.__setattr__(self, "layers", layers)
        if not layers or set(layers) - set(SIDES) or any(not kept for kept in layers.values()):
            raise ConfigError(f"extraction.layers={layers!r}: expected non-empty state lists for encoder/decoder")
        if self.tokens not in ("all", "pooled"):
            raise ConfigError(f"extraction.tokens={self.tokens!r}: expected all or pooled")
        if self.dtype not in DTYPES:
            raise ConfigError(f"extraction.dtype={self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ConfigError(f"extraction.max_length={self.max_length!r}: expected an integer >= 2")
        if not isinstance(self.template, str) or not self.template:
            raise ConfigError(f"extraction.template={self.template!r}: expected the store's template name")

    def per_token(self, side: str) -> bool:
        """Whether ``side`` holds one row per token: the encoder side of an all-tokens store."""
        return keeps_every_token(side, self.tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": {s: list(k) for s, k in self.layers.items()}, "tokens": self.tokens,
                "dtype": self.dtype, "max_length": self.max_length, "template": self.template}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExtractionSettings:
        return _build(cls, data, "extraction")

    @classmethod
    def from_store_meta(cls, meta: StoreMeta) -> ExtractionSettings:
        """The settings a store was extracted with."""
        settings = meta.settings
        return cls(layers=meta.layout.layers, tokens=settings.tokens, dtype=settings.dtype,
                   max_length=settings.max_length, template=meta.task.template)


@dataclass(frozen=True)
class AdapterConfig:
    """Everything ``adapter_config.json`` holds: the side network, its seed, and where its inputs came from.

    ``extraction`` is None only for adapters written before it was recorded: they load, but cannot
    be used on new text (``pipeline predict`` refuses them).
    """

    read: ReadConfig
    seed: int
    task: str
    base_model_name_or_path: str
    revision: str  # the backbone's content hash or Hub commit, as recorded in the store
    store_fingerprint: str
    extraction: ExtractionSettings | None
    peft_type: str = PEFT_TYPE

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed={self.seed!r}: expected a non-negative integer")
        spec = get_task(self.task)
        object.__setattr__(self, "task", spec.name)
        if spec.num_labels != self.read.num_labels or spec.kind != self.read.task_kind:
            raise ConfigError(f"task {spec.name} has {spec.num_labels} label(s) ({spec.kind}); the side network "
                              f"has {self.read.num_labels} ({self.read.task_kind})")
        if self.peft_type != PEFT_TYPE:
            raise ConfigError(f"peft_type={self.peft_type!r}: this software reads {PEFT_TYPE} adapters only")

    @classmethod
    def from_store_meta(cls, meta: StoreMeta, read: ReadConfig, seed: int) -> AdapterConfig:
        """The record of a seed trained from the store whose metadata is ``meta``."""
        return cls(read=read, seed=seed, task=meta.task.name, base_model_name_or_path=meta.backbone.name,
                   revision=meta.backbone.revision, store_fingerprint=meta.fingerprint,
                   extraction=ExtractionSettings.from_store_meta(meta))

    def to_dict(self) -> dict[str, Any]:
        """The JSON payload: flat like PEFT's, the method upper-case ("READ" / "PROBE"), sorted keys."""
        payload: dict[str, Any] = {**self.read.to_dict(), "method": self.read.method.upper(), "seed": self.seed,
                                   "peft_type": self.peft_type, "task": self.task,
                                   "base_model_name_or_path": self.base_model_name_or_path,
                                   "revision": self.revision, "store_fingerprint": self.store_fingerprint}
        if self.extraction is not None:
            payload["extraction"] = self.extraction.to_dict()
        return dict(sorted(payload.items()))

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> AdapterConfig:
        """Parse a payload; unknown keys are refused (a newer format), missing ones named."""
        payload = dict(payload)
        read_names = {f.name for f in dataclasses.fields(ReadConfig)}
        known = read_names | {"seed", "peft_type", "extraction", *_PROVENANCE}
        unknown = sorted(set(payload) - known)
        if unknown:
            raise ConfigError(f"unknown adapter_config.json key(s) {', '.join(unknown)} (written by a newer version?)")
        missing = sorted({"seed", *_PROVENANCE} - set(payload))
        if missing:
            raise ConfigError(f"adapter_config.json lacks {', '.join(missing)}")
        read = {k: v for k, v in payload.items() if k in read_names}
        if isinstance(read.get("method"), str):
            read["method"] = read["method"].lower()
        extraction = payload.get("extraction")
        return cls(
            read=ReadConfig.from_dict(read), seed=payload["seed"], task=payload["task"],
            base_model_name_or_path=payload["base_model_name_or_path"], revision=payload["revision"],
            store_fingerprint=payload["store_fingerprint"], peft_type=payload.get("peft_type", PEFT_TYPE),
            extraction=None if extraction is None else ExtractionSettings.from_dict(extraction),
        )


def _build(cls: type, data: Mapping[str, Any], what: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(data, Mapping) or set(data) != names:
        shown = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ConfigError(f"adapter_config.json {what}: expected keys {sorted(names)}, found {shown}")
    return cls(**data)


def save_adapter(directory: str | Path, model: ReadModel, k: int, config: AdapterConfig) -> None:
    """Write seed k of ``model`` as ``adapter_model.safetensors`` + ``adapter_config.json``."""
    from safetensors.torch import save

    if config.read != model.config or config.seed != model.seeds[k]:
        raise ConfigError(f"adapter config (seed {config.seed}) does not describe seed {model.seeds[k]} of this model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.cpu().contiguous() for n, t in model.seed_state_dict(k).items()}
    if model.label_rows is not None:
        tensors["label_rows"] = model.label_rows.detach().cpu().contiguous()
    atomic_write_bytes(directory / ADAPTER_WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    atomic_write_text(directory / ADAPTER_CONFIG_NAME, json.dumps(config.to_dict(), sort_keys=True, indent=2) + "\n")


SEED_FOLDER = re.compile(r"seed_(0|[1-9][0-9]*)")  # adapters/seed_<k>/, k as str(int) writes it


def saved_seeds(root: str | Path) -> list[int]:
    """The seeds with an adapter saved under ``root`` (``root/seed_<k>/adapter_config.json``), in order."""
    root = Path(root)
    named = (SEED_FOLDER.fullmatch(f.name) for f in root.glob("seed_*")) if root.is_dir() else ()
    return sorted(int(m[1]) for m in named if m and (root / m[0] / ADAPTER_CONFIG_NAME).is_file())


def remove_stale_adapters(root: str | Path, seeds: Iterable[int]) -> list[Path]:
    """Remove ``root/seed_<k>/`` of every seed not in ``seeds``, so a rerun with other seeds leaves only its own.

    Only folders named ``seed_<int>`` holding nothing but adapter files (and their partial writes)
    are removed; anything else a user put there is left alone. Returns the folders removed.
    """
    root, keep = Path(root), {int(s) for s in seeds}
    ours = {name for base in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME) for name in (base, partial_path(base).name)}
    removed = []
    for folder in sorted(root.glob("seed_*")) if root.is_dir() else []:
        named = SEED_FOLDER.fullmatch(folder.name)
        if not named or int(named[1]) in keep or not folder.is_dir() or folder.is_symlink():
            continue
        entries = list(folder.iterdir())
        if any(e.name not in ours or not e.is_file() or e.is_symlink() for e in entries):
            continue
        for entry in entries:
            entry.unlink()
        folder.rmdir()
        removed.append(folder)
    return removed


def _require(directory: Path, name: str) -> Path:
    path = directory / name
    if not path.is_file():
        where = "no such folder" if not directory.is_dir() else f"it has no {name}"
        raise AdapterNotFoundError(f"{directory} is not a complete adapter ({where}); expected {ADAPTER_CONFIG_NAME} "
                                   f"and {ADAPTER_WEIGHTS_NAME} as `pipeline train` writes them")
    return path


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    """The typed record of ``directory/adapter_config.json`` (one-line errors for broken files)."""
    path = _require(Path(directory), ADAPTER_CONFIG_NAME)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(payload, dict):
            raise TypeError("not a JSON object")
        return AdapterConfig.from_dict(payload)
    except (ValueError, TypeError) as exc:  # JSONDecodeError and ConfigError are ValueErrors
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AdapterError(f"{path}: {message}") from None


def load_adapter(directory: str | Path) -> tuple[ReadModel, AdapterConfig]:
    """A 1-seed model equal to the saved seed, and its record."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = _require(directory, ADAPTER_WEIGHTS_NAME)
    try:
        tensors = load_file(str(weights))
    except SafetensorError as exc:  # truncated or not a safetensors file at all
        raise AdapterError(f"{weights} is damaged ({str(exc).splitlines()[0]}); copy the adapter again, "
                           "or train it again") from None
    label_rows = tensors.pop("label_rows", None)
    try:
        model = ReadModel(config.read, [config.seed], label_rows=label_rows)
        model.load_seed_state_dict(0, tensors)
    except (ValueError, ConfigError) as exc:
        raise AdapterError(f"{directory / ADAPTER_WEIGHTS_NAME} does not fit its adapter_config.json: {exc}") from None
    return model, config
