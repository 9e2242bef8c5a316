"""Writing predictions: GLUE submission files for a GLUE split, per-example rows with probabilities for free text.

A GLUE submission has one line per example, ``index<TAB>prediction``, with the labels written as the
GLUE server reads them: the label names for MNLI, QNLI and RTE, 0/1 for the other classification
tasks (whose GLUE files hold digits), and the score for STS-B. Free text gets, per example, its index,
its text fields, the predicted label name (or score) and the probability of every class.
Either is written as --out's extension says (``output_format``): TSV, CSV or JSONL.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from pipeline.common.errors import ConfigError
from pipeline.common.tasks import TaskSpec
from pipeline.inference.predictor import Head
from pipeline.inference.texts import JSONL_SUFFIXES, TSV_SUFFIXES

OUTPUT_FORMATS = {**dict.fromkeys(TSV_SUFFIXES, "tsv"), ".csv": "csv", **dict.fromkeys(JSONL_SUFFIXES, "jsonl")}


def output_format(out: str, default: str) -> str:
    """tsv, csv or jsonl by --out's extension; stdout (-) or no extension: ``default`` (a GLUE split: tsv, as GLUE's
    server reads it; free text: the input's format). Another extension is refused rather than given tab-separated
    text under a name that promises something else."""
    suffix = Path(out).suffix.lower() if out != "-" else ""
    if not suffix:
        return default
    if suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"--out {out}: cannot write {suffix} files; name it .tsv, .csv or .jsonl "
                          "(or - for stdout)")
    return OUTPUT_FORMATS[suffix]

NAMED_LABELS = ("mnli", "qnli", "rte")  # GLUE's own files (and its server) use label names for these


def glue_label(task: TaskSpec, value: float) -> str:
    """One prediction as a GLUE submission writes it."""
    if task.kind == "regression":
        return f"{float(value):.3f}"
    return task.label_names[int(value)] if task.name in NAMED_LABELS else str(int(value))


def _suffix(heads: Sequence[Head], head: Head) -> str:
    return "" if len(heads) == 1 else f"_{head.name}"


def write_submission(stream: TextIO, fmt: str, task: TaskSpec, ids: Sequence[int | str],
                     heads: Sequence[Head]) -> None:
    """``index``, ``prediction`` (several adapters without --ensemble: one ``prediction_<name>`` column each)."""
    write_records(stream, fmt, [{"index": index, **{f"prediction{_suffix(heads, h)}": glue_label(task, h.values[i])
                                                    for h in heads}} for i, index in enumerate(ids)])


def _readable(task: TaskSpec, value: float) -> str | float:
    return round(float(value), 6) if task.kind == "regression" else task.label_names[int(value)]


def write_rows(stream: TextIO, fmt: str, task: TaskSpec, ids: Sequence[int | str], texts: Sequence[dict[str, str]],
               heads: Sequence[Head]) -> None:
    """One row per example: index, text fields, then per head the prediction and ``p_<label>`` columns.

    The index is written as ``read_texts`` gives it: an integer (the input's integer index, else the row number)
    is a JSON number in JSONL, as a GLUE split's idx is in ``write_submission``."""
    records = []
    for i, (index, text) in enumerate(zip(ids, texts)):
        record: dict[str, int | str | float] = {"index": index, **text}
        for head in heads:
            suffix = _suffix(heads, head)
            record[f"prediction{suffix}"] = _readable(task, head.values[i])
            if head.probabilities is not None:
                for label, p in zip(task.label_names, head.probabilities[i]):
                    record[f"p_{label}{suffix}"] = round(float(p), 6)
        records.append(record)
    write_records(stream, fmt, records)


def write_records(stream: TextIO, fmt: str, records: Sequence[dict[str, Any]]) -> None:
    """Records with the same keys as JSONL, CSV (the csv module's quoting) or TSV.

    TSV cells have tabs and line breaks replaced by spaces (quoting is off, as in GLUE files).
    """
    if fmt == "jsonl":
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        return
    columns = list(records[0]) if records else []
    if fmt == "csv":
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([record[c] for c in columns] for record in records)
        return
    stream.write("\t".join(columns) + "\n")
    for record in records:
        stream.write("\t".join(" ".join(str(record[c]).split()) for c in columns) + "\n")
