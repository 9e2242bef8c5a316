"""`pipeline predict` end to end: read the text (errors first, before any model), predict, write, score."""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from pipeline.common.errors import ConfigError
from pipeline.common.files import atomic_write_text, check_writable_folder
from pipeline.common.resources import pick_device
from pipeline.common.tasks import get_task
from pipeline.extraction.glue import load_split
from pipeline.inference.outputs import output_format, write_rows, write_submission
from pipeline.inference.predictor import Predictor, check_batch_tokens, load_adapters
from pipeline.inference.texts import check_input_name, read_texts
from pipeline.training.metrics import compute_metrics, primary_metric


@dataclass(frozen=True)
class PredictRequest:
    """What `pipeline predict` was asked for (the CLI's options)."""

    adapters: tuple[str, ...]
    task: str | None = None
    split: str | None = None
    glue_dir: str | None = None
    input: str | None = None
    out: str = "-"
    ensemble: bool = False
    model: str | None = None
    limit: int | None = None
    batch_tokens: int = 16384
    device: str = "auto"

    def __post_init__(self) -> None:
        if (self.split is None) == (self.input is None):
            raise ConfigError("predict needs exactly one of --split (a GLUE split) or --input (a TSV/JSONL file or -)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be a positive number of examples, got {self.limit}")
        if self.batch_tokens < 1:
            raise ConfigError(f"--batch-tokens must be positive, got {self.batch_tokens}")
        output_format(self.out, "tsv")  # an extension we cannot write is refused before any work
        if self.input is not None:
            check_input_name(self.input)  # a CSV file is refused before the adapters load
        pick_device(self.device)  # a device this machine lacks is refused before the text, adapters or model load


@dataclass
class PredictResult:
    """What was written, and the metrics of a labeled split (per head name)."""

    task: str
    examples: int
    out: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    cut: int = 0  # examples truncated to the adapters' max_length
    max_length: int = 0


def run_predict(request: PredictRequest, *, progress: bool = True, stdin: TextIO | None = None,
                stdout: TextIO | None = None) -> PredictResult:
    """Predict a GLUE split or free text with one or several adapters, sharing one forward pass."""
    if request.out != "-":
        if Path(request.out).is_dir():  # else os.replace would refuse it only after the forward passes
            raise ConfigError(f"--out {request.out} is a folder; name a file (.tsv, .csv or .jsonl) or - for stdout")
        check_writable_folder(Path(request.out).parent)  # before the model loads, not after the forward passes
    adapters = load_adapters(request.adapters, task=request.task)
    check_batch_tokens(request.batch_tokens, adapters[0].config)  # before the model loads
    task = adapters[0].config.task
    if request.split is not None:
        split = load_split(task, request.split, request.glue_dir, limit=request.limit)
        texts, ids, labels = split.texts, [int(i) for i in split.ids], split.labels
        fmt = output_format(request.out, "tsv")
    else:
        assert request.input is not None
        given = read_texts(request.input, get_task(task), limit=request.limit, stdin=stdin)
        texts, ids, labels = given.texts, given.ids, None
        fmt = output_format(request.out, given.format)
    predictor = Predictor.load(adapters, model=request.model, device=request.device)
    predictions = predictor.predict(texts, batch_tokens=request.batch_tokens, progress=progress)
    heads = predictions.heads(ensemble=request.ensemble)
    buffer = io.StringIO(newline="")
    stream = (stdout or sys.stdout) if request.out == "-" else buffer
    if request.split is not None:
        write_submission(stream, fmt, predictor.task, ids, heads)
    else:
        write_rows(stream, fmt, predictor.task, ids, texts, heads)
    if request.out != "-":  # whole or not at all: a stopped or failed run leaves an earlier file as it was
        Path(request.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(request.out, buffer.getvalue())
    result = PredictResult(task, len(texts), request.out, cut=predictions.cut,
                           max_length=predictor.extraction.max_length)
    if labels is not None and _labeled(predictor.task.kind, labels):
        result.metrics = {h.name: compute_metrics(predictor.task, h.values, labels) for h in heads}
    return result


def metric_lines(result: PredictResult, split: str | None) -> list[str]:
    """One line per head: the official metric of a labeled split (primary first)."""
    lines = []
    for name, metrics in result.metrics.items():
        primary = primary_metric(result.task)
        shown = ", ".join(f"{m} {v:.2f}" for m, v in sorted(metrics.items(), key=lambda kv: kv[0] != primary))
        lines.append(f"{result.task}/{split} {name}: {shown}")
    return lines


def _labeled(kind: str, labels: np.ndarray) -> bool:
    return bool(np.isfinite(labels).all()) if kind == "regression" else bool((labels >= 0).all())
