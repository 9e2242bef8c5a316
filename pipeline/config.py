"""One frozen config per stage; the same field names in params.yaml, the CLI and the store.

Validation lives in ``__post_init__`` and does no I/O, so a bad setting fails before any work.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from pipeline.errors import ConfigError

DTYPES = ("bfloat16", "float32", "float16")
DEVICES_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def parse_list(value: str | list | tuple | None, cast: type = str) -> tuple | None:
    """'a,b' or a YAML list -> tuple; None/'all'/'' -> None."""
    if value is None or value == "" or value == "all":
        return None
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    else:
        items = list(value)
    try:
        return tuple(cast(v) for v in items)
    except ValueError as exc:
        raise ConfigError(f"cannot read {value!r} as a comma-separated list of {cast.__name__}") from exc


def parse_size(value: str | int | None) -> int | None:
    """'8GB', '512MiB', 1000000 -> bytes."""
    if value is None or isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", str(value), re.IGNORECASE)
    if not match:
        raise ConfigError(f"cannot read size {value!r}; write e.g. 8GB or 512MiB")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** "_KMGT".index(unit or "_")) if unit else int(number)


def from_mapping(cls: type, values: Mapping[str, Any]):
    """Build a config from params.yaml-style keys; unknown keys are refused, not ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} setting(s) {unknown}; known: {sorted(names)}")
    return cls(**values)


@dataclass(frozen=True)
class ExtractConfig:
    """Stage one: which backbone over which task, and how the store is laid out."""

    model: str
    task: str
    out: str | None = None  # default data/<task>.zarr
    glue_dir: str | None = None  # None: $GLUE_DIR, else the Hugging Face Hub
    splits: tuple[str, ...] | None = None  # None: every split the source has
    max_length: int = 256  # tokens per example after truncation
    batch_tokens: int = 16384  # padded tokens per forward batch (batches are built by length)
    dtype: str = "bfloat16"  # storage dtype; bfloat16 is kept as uint16 bits
    device: str = "auto"
    layers: tuple[int, ...] | None = None  # None: every state (embeddings + each block)
    tokens: str = "all"  # all: every token; pooled: per layer the masked mean over tokens
    limit: int | None = None  # first N examples per split (smoke tests)
    block_tokens: int | None = None  # rows per block/shard; None: about 128 MiB a shard
    codec: str = "zstd"
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "splits", parse_list(self.splits))
        object.__setattr__(self, "layers", parse_list(self.layers, int))
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.tokens not in ("all", "pooled"):
            raise ConfigError(f"tokens {self.tokens!r} must be 'all' or 'pooled'")
        if not DEVICES_RE.match(self.device):
            raise ConfigError(f"device {self.device!r} must be auto, cpu, cuda or cuda:N")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}")
        if self.batch_tokens < self.max_length:
            raise ConfigError(
                f"batch_tokens ({self.batch_tokens}) must be at least max_length ({self.max_length}) "
                "so the longest example fits in a batch"
            )
        if self.block_tokens is not None and self.block_tokens < self.max_length:
            raise ConfigError(f"block_tokens ({self.block_tokens}) must be at least max_length ({self.max_length})")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be a positive number of examples, got {self.limit}")
        if self.codec not in ("zstd", "blosc-zstd", "none"):
            raise ConfigError(f"codec {self.codec!r} must be zstd, blosc-zstd or none")

    @property
    def out_path(self) -> str:
        return self.out or f"data/{self.task.lower()}.zarr"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["splits"] = list(self.splits) if self.splits else None
        out["layers"] = list(self.layers) if self.layers else None
        return out
