"""Writing predictions: GLUE submission files for a GLUE split, TSV or JSONL rows for free text.

A GLUE submission has one line per example, ``index<TAB>prediction``, with the labels written as the
GLUE server reads them: the label names for MNLI, QNLI and RTE, 0/1 for the other classification
tasks (whose GLUE files hold digits), and the score for STS-B. Free text gets, per example, its index,
its text fields, the predicted label name (or score) and the probability of every class.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TextIO

from pipeline.common.tasks import TaskSpec
from pipeline.inference.predictor import Head

NAMED_LABELS = ("mnli", "qnli", "rte")  # GLUE's own files (and its server) use label names for these


def glue_label(task: TaskSpec, value: float) -> str:
    """One prediction as a GLUE submission writes it."""
    if task.kind == "regression":
        return f"{float(value):.3f}"
    return task.label_names[int(value)] if task.name in NAMED_LABELS else str(int(value))


def _suffix(heads: Sequence[Head], head: Head) -> str:
    return "" if len(heads) == 1 else f"_{head.name}"


def write_submission(stream: TextIO, task: TaskSpec, ids: Sequence[int | str], heads: Sequence[Head]) -> None:
    """``index<TAB>prediction`` (several adapters without --ensemble: one ``prediction_<name>`` column each)."""
    stream.write("\t".join(["index", *(f"prediction{_suffix(heads, h)}" for h in heads)]) + "\n")
    stream.writelines("\t".join([str(index), *(glue_label(task, h.values[i]) for h in heads)]) + "\n" for i, index in enumerate(ids))


def _readable(task: TaskSpec, value: float) -> str | float:
    return round(float(value), 6) if task.kind == "regression" else task.label_names[int(value)]


def write_rows(stream: TextIO, fmt: str, task: TaskSpec, ids: Sequence[str], texts: Sequence[dict[str, str]],
               heads: Sequence[Head]) -> None:
    """One row per example: index, text fields, then per head the prediction and ``p_<label>`` columns.

    TSV text cells have tabs and line breaks replaced by spaces (quoting is off, as in GLUE files).
    """
    records = []
    for i, (index, text) in enumerate(zip(ids, texts)):
        record: dict[str, str | float] = {"index": index, **text}
        for head in heads:
            suffix = _suffix(heads, head)
            record[f"prediction{suffix}"] = _readable(task, head.values[i])
            if head.probabilities is not None:
                for label, p in zip(task.label_names, head.probabilities[i]):
                    record[f"p_{label}{suffix}"] = round(float(p), 6)
        records.append(record)
    if fmt == "jsonl":
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        return
    columns = list(records[0])
    stream.write("\t".join(columns) + "\n")
    for record in records:
        cells = (" ".join(str(record[c]).split()) if c in task.text_fields else str(record[c]) for c in columns)
        stream.write("\t".join(cells) + "\n")
