"""Load a GLUE split from a local glue_data/ folder or from the Hugging Face Hub, into one shape.

Both sources give the same ``GlueSplit`` (Hub column names, Hub label indices, Hub ``idx``), so
nothing downstream knows where the data came from except ``source``, which goes into the store.
Local TSVs are read with quoting disabled: with default CSV quoting MRPC, QNLI and STS-B lose rows
and RTE silently changes the text of 76 rows (docs/design.md, "GLUE data").
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.common.errors import (
    DataNotFoundError,
    EmptySplitError,
    MalformedGlueFileError,
)
from pipeline.common.tasks import TaskSpec, get_task

HUB_DATASET = "nyu-mll/glue"

# Local file of each split in the classic glue_data/ layout.
_SPLIT_FILES = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "test": "test.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
    "test_matched": "test_matched.tsv",
    "test_mismatched": "test_mismatched.tsv",
}


@dataclass(frozen=True)
class _TsvColumns:
    """Header names of a task's TSVs: the text columns (aligned with text_fields) and the label."""

    text: tuple[str, ...]
    label: str  # absent from the header of unlabeled test files


_COLUMNS = {
    "cola": _TsvColumns(("sentence",), "label"),
    "sst2": _TsvColumns(("sentence",), "label"),
    "mrpc": _TsvColumns(("#1 String", "#2 String"), "Quality"),
    "qqp": _TsvColumns(("question1", "question2"), "is_duplicate"),
    "stsb": _TsvColumns(("sentence1", "sentence2"), "score"),
    "mnli": _TsvColumns(("sentence1", "sentence2"), "gold_label"),  # premise, hypothesis
    "qnli": _TsvColumns(("question", "sentence"), "label"),
    "rte": _TsvColumns(("sentence1", "sentence2"), "label"),
    "wnli": _TsvColumns(("sentence1", "sentence2"), "label"),
}

def glue_text_columns(task: str) -> tuple[str, ...]:
    """The header names of a task's text columns in its GLUE files, in the task's field order (MRPC: ``#1 String``,
    ``#2 String``; MNLI: ``sentence1`` for the premise)."""
    return _COLUMNS[task].text


# CoLA train/dev have no header row; these are their four columns (test.tsv has a header).
_COLA_HEADER = ("source", "label", "author_mark", "sentence")


@dataclass
class GlueSplit:
    """One split of one task, as texts, labels and GLUE indices, plus where it came from."""

    task: TaskSpec
    split: str
    texts: list[dict[str, str]]  # one dict per example, keyed by task.text_fields
    labels: np.ndarray  # (N,) int64 class index, -1 if unlabeled; float32 for stsb, nan if unlabeled
    ids: np.ndarray  # (N,) int64 GLUE idx: row position in the file, as the Hub's idx column
    source: str  # "local:<absolute path of the file>" or "hub:nyu-mll/glue"

    def __len__(self) -> int:
        return len(self.texts)


def resolve_glue_dir(glue_dir: str | os.PathLike | None) -> Path | None:
    """The local glue_data/ folder to read: the argument, else $GLUE_DIR, else None (use the Hub)."""
    if glue_dir is not None and str(glue_dir) != "":
        return Path(glue_dir).expanduser()
    env = os.environ.get("GLUE_DIR")
    if env:
        return Path(env).expanduser()
    return None


def load_split(
    task: str | TaskSpec,
    split: str,
    glue_dir: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
) -> GlueSplit:
    """Load ``split`` of ``task``, the first ``limit`` examples only if given.

    Reads ``<glue_dir>/<Task>/<file>.tsv`` when a local folder is given (argument or $GLUE_DIR),
    otherwise ``nyu-mll/glue`` from the Hub.
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    spec.require_split(split)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    root = resolve_glue_dir(glue_dir)
    if root is None:
        result = _load_hub(spec, split, limit)
    else:
        result = _load_local(spec, split, root, limit)
    if len(result) == 0:
        raise EmptySplitError(
            f"{spec.name}/{split} has no examples (limit={limit}) in {result.source}; "
            "an empty split would make an empty store"
        )
    return result


def _load_local(spec: TaskSpec, split: str, root: Path, limit: int | None) -> GlueSplit:
    path = root / spec.glue_dir_name / _SPLIT_FILES[split]
    if not path.is_file():
        raise DataNotFoundError(
            f"{spec.name}/{split}: no file {path}; expected the classic glue_data/ layout, "
            f"<glue-dir>/{spec.glue_dir_name}/{_SPLIT_FILES[split]} (as download_glue_data.py writes it)"
        )
    texts: list[dict[str, str]] = []
    labels: list[int | float] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            # Quoting off: one record is one line, so line_num is the file's line number.
            # utf-8-sig drops MRPC's byte-order mark, which would otherwise prefix "Quality".
            reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = _COLA_HEADER if _is_headerless(spec, split) else tuple(next(reader, ()))
            text_idx, label_idx = _column_positions(path, spec, header)
            for row in reader:
                if not row:  # a blank line (e.g. a trailing one) is not a record
                    continue
                if limit is not None and len(texts) >= limit:
                    break
                where = f"{path}, line {reader.line_num}"
                if len(row) != len(header):
                    raise MalformedGlueFileError(
                        f"{where}: {len(row)} tab-separated fields, expected {len(header)} "
                        f"({', '.join(header)}); the file is malformed or not a GLUE TSV"
                    )
                texts.append({field: row[i] for field, i in zip(spec.text_fields, text_idx)})
                if label_idx is not None:
                    try:
                        labels.append(_parse_label(spec, row[label_idx]))
                    except ValueError as exc:
                        raise MalformedGlueFileError(f"{where}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise MalformedGlueFileError(
            f"{_undecodable_place(path, exc)}; the file is damaged or in another encoding: "
            "download it again, or convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    return GlueSplit(
        task=spec,
        split=split,
        texts=texts,
        labels=(
            np.array(labels, dtype=_label_dtype(spec))
            if label_idx is not None
            else _unlabeled(spec, len(texts))
        ),
        ids=np.arange(len(texts), dtype=np.int64),
        source=f"local:{path.resolve()}",
    )


def _undecodable_place(path: Path, exc: UnicodeDecodeError) -> str:
    """"<file>, line N: not valid UTF-8 (...)" for the first bad line, found by re-reading the bytes.

    The decoder works on buffered chunks, so its byte position is not a position in the file; an
    error path can afford a second pass. A newline byte never occurs inside a UTF-8 sequence, so
    decoding line by line finds the same fault.
    """
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                return (f"{path}, line {number}: not valid UTF-8 (byte 0x{raw[bad.start]:02x}, "
                        f"byte {bad.start + 1} of the line: {bad.reason})")
    return f"{path}: not valid UTF-8 ({exc.reason})"


def _is_headerless(spec: TaskSpec, split: str) -> bool:
    return spec.name == "cola" and not split.startswith("test")


def _column_positions(path: Path, spec: TaskSpec, header: tuple[str, ...]) -> tuple[list[int], int | None]:
    """Positions of the text columns and of the label column (None: an unlabeled test file)."""
    columns = _COLUMNS[spec.name]
    missing = [c for c in columns.text if c not in header]
    if missing:
        raise MalformedGlueFileError(
            f"{path}: header lacks column(s) {missing} for {spec.name}; found {list(header)}"
        )
    text_idx = [header.index(c) for c in columns.text]
    label_idx = header.index(columns.label) if columns.label in header else None
    return text_idx, label_idx


def _label_dtype(spec: TaskSpec) -> type:
    return np.float32 if spec.kind == "regression" else np.int64


def _unlabeled(spec: TaskSpec, n: int) -> np.ndarray:
    fill = math.nan if spec.kind == "regression" else -1
    return np.full(n, fill, dtype=_label_dtype(spec))


def _parse_label(spec: TaskSpec, value: str) -> int | float:
    """A label cell as the Hub's label: a class name or digit to its index, a score to float."""
    value = value.strip()
    if spec.kind == "regression":
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"score {value!r} is not a number") from None
    if value in spec.label_names:
        return spec.label_names.index(value)
    if value.isdigit() and int(value) < spec.num_labels:
        return int(value)
    raise ValueError(
        f"label {value!r} is neither a class index below {spec.num_labels} "
        f"nor one of {', '.join(spec.label_names)}"
    )


def offline_flag(*names: str) -> str | None:
    """``NAME=value`` of the first of these environment variables that switches offline mode on, or None."""
    for name in names:
        value = os.environ.get(name, "")
        if value.strip().lower() in ("1", "true", "yes", "on"):
            return f"{name}={value}"
    return None


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached, or None if a connection opens; seconds at most, not minutes.

    Without this, ``datasets`` and ``transformers`` retry for about half a minute before giving up;
    a missing data source or model should stop a run at once. Used by both loaders (data, model).
    """
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as exc:
        return f"{url.hostname} unreachable: {exc}"
    return None


def _load_hub(spec: TaskSpec, split: str, limit: int | None) -> GlueSplit:
    # Offline mode: datasets reads its local cache or fails at once by itself.
    unreachable = None if offline_flag("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") else hub_unreachable()
    if unreachable:
        raise DataNotFoundError(
            f"{spec.name}/{split}: no local GLUE folder given and the Hugging Face Hub is not reachable "
            f"({unreachable}). Provide the data by either --glue-dir DIR (or GLUE_DIR) pointing at a "
            "glue_data folder, or network access to the Hugging Face Hub (HF_DATASETS_OFFLINE=1 uses a cached copy)"
        )
    import datasets  # heavy; only the Hub path needs it
    from datasets.exceptions import DatasetsError

    try:
        ds = datasets.load_dataset(HUB_DATASET, spec.name, split=split)
    except (OSError, DatasetsError) as exc:
        raise DataNotFoundError(
            f"{spec.name}/{split}: no local GLUE folder given and {HUB_DATASET} could not be loaded "
            f"from the Hugging Face Hub ({type(exc).__name__}: {exc}). Provide the data by either "
            "--glue-dir DIR (or GLUE_DIR) pointing at a glue_data folder, or network access to the "
            "Hugging Face Hub"
        ) from exc
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    columns = [list(ds[field]) for field in spec.text_fields]
    texts = [dict(zip(spec.text_fields, values)) for values in zip(*columns)]
    labels = np.asarray(list(ds["label"]), dtype=_label_dtype(spec))
    if spec.kind == "regression":
        labels[labels < 0] = np.nan  # the Hub marks unlabeled STS-B test rows with -1.0
    return GlueSplit(
        task=spec,
        split=split,
        texts=texts,
        labels=labels.reshape(len(texts)),
        ids=np.asarray(list(ds["idx"]), dtype=np.int64).reshape(len(texts)),
        source=f"hub:{HUB_DATASET}",
    )
