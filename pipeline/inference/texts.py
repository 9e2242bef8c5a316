"""Text to predict on: a TSV with a header naming the task's text columns, or JSONL objects, or stdin.

Errors name the line, so a bad row in a long file is found at once. TSVs are read with quoting off,
like the GLUE files (one record is one line), and a header may name the text columns as the task's fields
(``sentence1``) or as its GLUE file does (MRPC's ``#1 String``), so a GLUE ``test.tsv`` can be passed as it is.
Lines end at ``\n``, ``\r\n`` or ``\r`` only: other Unicode line breaks (U+2028, NEL) are text, as JSON and the
GLUE files' CSV reading take them.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pipeline.common.errors import InputFormatError
from pipeline.common.tasks import TaskSpec
from pipeline.extraction.glue import glue_text_columns

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TSV_SUFFIXES = (".tsv", ".txt")
INDEX_COLUMNS = ("index", "idx")  # carried through to the output when the input has one
CSV_REFUSED = "CSV input is not read; give a TSV (tab-separated, header naming the columns) or JSONL"


@dataclass
class InputTexts:
    """Examples keyed by the task's text fields, their indices, and the format they came in."""

    texts: list[dict[str, str]]
    ids: list[int | str]  # an integer index (a GLUE idx, a row number) as an integer, so JSONL writes a number
    format: str  # "tsv" | "jsonl"
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def format_of(path: str, first_line: str | None = None) -> str:
    """tsv or jsonl: from the file's suffix, else from the first non-blank line ('{' means JSONL)."""
    suffix = Path(path).suffix.lower() if path != "-" else ""
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in TSV_SUFFIXES:
        return "tsv"
    return "jsonl" if (first_line or "").lstrip().startswith("{") else "tsv"


def check_input_name(path: str) -> None:
    """Refuse a ``.csv`` file by its name: read as a TSV its header is one comma-joined column, which would be
    reported as missing columns instead of the real problem, a format this reader does not take."""
    if path != "-" and Path(path).suffix.lower() == ".csv":
        raise InputFormatError(f"{path}: {CSV_REFUSED}")


def read_texts(path: str, task: TaskSpec, *, limit: int | None = None, stdin: TextIO | None = None) -> InputTexts:
    """Read ``path`` (``-``: stdin) as examples of ``task``; the first ``limit`` only if given."""
    check_input_name(path)
    source = "<stdin>" if path == "-" else str(Path(path))
    if path != "-" and not Path(path).is_file():
        raise InputFormatError(f"input {path}: no such file")
    try:
        text = (stdin or sys.stdin).read() if path == "-" else Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputFormatError(f"input {source}: not UTF-8 text (byte {exc.start} cannot be decoded); "
                               "save it as UTF-8") from None
    lines = re.split(r"\r\n|\r|\n", text)  # not str.splitlines, which also breaks at U+2028, NEL, ...
    if lines and lines[0].startswith("\ufeff"):  # a byte-order mark on stdin
        lines[0] = lines[0][1:]
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise InputFormatError(f"input {source} has no examples (it is empty)")
    fmt = format_of(path, first)
    texts, ids = (_read_jsonl if fmt == "jsonl" else _read_tsv)(lines, source, task, limit)
    if not texts:
        raise InputFormatError(f"input {source} has no examples (only a header or blank lines)")
    check_unique(ids, source)
    return InputTexts(texts, ids, fmt, source)


def check_unique(ids: Sequence[int | str], source: str) -> None:
    """Refuse an index given twice: predictions are matched to examples by it (a GLUE submission by its idx)."""
    seen: set[int | str] = set()
    for index in ids:
        if index in seen:
            raise InputFormatError(f"input {source}: index {index!r} is given to two examples; an index names one "
                                   "example (leave the column out to number the examples)")
        seen.add(index)


def check_examples(texts: Sequence[Mapping[str, object]], task: TaskSpec) -> None:
    """What the readers guarantee, for examples handed over in Python: at least one, each a mapping with the
    task's text fields as strings."""
    if not texts:
        raise InputFormatError("no examples to predict on (an empty list)")
    for number, example in enumerate(texts):
        if not isinstance(example, Mapping):
            raise InputFormatError(f"example {number}: expected a mapping of {', '.join(task.text_fields)}, found "
                                   f"{type(example).__name__}")
        missing = [f for f in task.text_fields if not isinstance(example.get(f), str)]
        if missing:
            raise InputFormatError(f"example {number}: no text field(s) {missing}; a {task.name} example has string "
                                   f"fields {', '.join(task.text_fields)}")


def _index(value: object) -> int | str:
    """An example's index as the output carries it: an integer (given as one, or as its decimal text, or a row
    number) stays an integer, so JSONL writes a number; anything else is text. TSV and CSV cells read the same."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value)
    return int(text) if re.fullmatch(r"-?(0|[1-9][0-9]*)", text) else text  # "12" -> 12; "007", "1e3" stay text


def _read_tsv(lines: list[str], source: str, task: TaskSpec, limit: int | None) -> tuple[list[dict[str, str]], list[int | str]]:
    rows = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(rows)
    columns = task.text_fields
    if any(f not in header for f in columns) and all(c in header for c in glue_text_columns(task.name)):
        columns = glue_text_columns(task.name)  # the GLUE file's own names (MRPC: #1 String, #2 String)
    missing = [f for f in columns if f not in header]
    if missing and len(header) == 1 and "," in header[0]:  # comma-separated, whatever its name says
        raise InputFormatError(f"{source}, line 1: the header {header[0]!r} is comma-separated: {CSV_REFUSED}")
    if missing:
        raise InputFormatError(
            f"{source}, line 1: the header {header} lacks column(s) {missing}; a {task.name} TSV names its text "
            f"columns {', '.join(task.text_fields)} in its first line"
        )
    positions = [header.index(c) for c in columns]
    index_at = next((header.index(c) for c in INDEX_COLUMNS if c in header), None)
    texts: list[dict[str, str]] = []
    ids: list[int | str] = []
    for row in rows:
        if limit is not None and len(texts) >= limit:
            break
        if not row or row == [""]:
            continue
        if len(row) != len(header):
            raise InputFormatError(
                f"{source}, line {rows.line_num}: {len(row)} tab-separated field(s), expected {len(header)} "
                f"({', '.join(header)})"
            )
        texts.append({f: row[i] for f, i in zip(task.text_fields, positions)})
        if index_at is not None and not row[index_at].strip():
            raise InputFormatError(f"{source}, line {rows.line_num}: the {header[index_at]} cell is empty; give "
                                   "every example its index, or leave the column out to number them")
        ids.append(_index(row[index_at]) if index_at is not None else len(ids))
    return texts, ids


def _read_jsonl(lines: list[str], source: str, task: TaskSpec, limit: int | None) -> tuple[list[dict[str, str]], list[int | str]]:
    texts: list[dict[str, str]] = []
    ids: list[int | str] = []
    for number, line in enumerate(lines, start=1):
        if limit is not None and len(texts) >= limit:
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputFormatError(f"{source}, line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise InputFormatError(f"{source}, line {number}: expected a JSON object, found {type(record).__name__}")
        missing = [f for f in task.text_fields if not isinstance(record.get(f), str)]
        if missing:
            raise InputFormatError(
                f"{source}, line {number}: no text field(s) {missing}; a {task.name} example is an object with "
                f"string fields {', '.join(task.text_fields)}"
            )
        texts.append({f: record[f] for f in task.text_fields})
        index = next((record[c] for c in INDEX_COLUMNS if record.get(c) is not None), len(ids))  # null: none given
        if isinstance(index, bool) or not isinstance(index, (int, str)):
            raise InputFormatError(f"{source}, line {number}: index {json.dumps(index)} must be an integer or a "
                                   "string")
        ids.append(_index(index))
    return texts, ids
