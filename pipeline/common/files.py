"""Output files written whole or not at all, so a crash (even ``kill -9``) never leaves half a file.

Every output of training and the report goes through ``atomic_write_bytes``/``atomic_write_text``:
the bytes go to a temporary file in the same folder (same file system, so the rename is atomic), are
flushed to disk, and only then replace the target with ``os.replace``. A reader sees the previous
file or the new one, never a mix. The temporary name is fixed per target (``.<name>.partial``), so a
run killed mid-write leaves at most that one file, which the rerun overwrites and renames away: one
writer per output file is assumed (one run per ``--out``).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | Path) -> Path:
    """The temporary file ``path`` is written to before it replaces the target."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step: readers see the old file or the new one, never a part."""
    path = Path(path)
    temp = partial_path(path)
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """``atomic_write_bytes`` of UTF-8 text, newlines kept as given (CSV rows keep their \\r\\n)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV file (the ``csv`` module's dialect: \\r\\n rows) written atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
