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
import errno
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PARTIAL_SUFFIX = ".partial"
RUN_LOCK = ".run.lock"  # held in a run folder while a run writes it (``hold_run_folder``)


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
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (str(temp), temp):
            # The temporary file is ours, not the user's: a failure names the output asked for (e.g. a folder
            # in the way of os.replace), so that the message points at what to fix.
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
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


def check_writable_folder(path: str | Path) -> Path:
    """Check that the folder ``path`` can be made and written, so that an output folder that cannot be written
    fails before hours of work, not after them: make it, write and remove a probe file, and remove again the
    folders this made (a run that stops later leaves nothing). A file in the way is named itself (not the folder
    asked for below it), and a place where no folder can be made says so; other OS errors pass as they are."""
    path = Path(path)
    made = []  # the folders this check creates, deepest first
    for above in [path, *path.parents]:  # the nearest existing ancestor must be a folder
        if above.exists() or above.is_symlink():
            if not above.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(above))
            break
        made.append(above)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileNotFoundError as exc:  # e.g. under /proc: the parent exists but takes no new folders
        raise OSError(f"cannot create the folder {path} ({exc.strerror}); choose another --out") from None
    probe = path / f".write-probe-{os.getpid()}{PARTIAL_SUFFIX}"
    try:
        probe.write_bytes(b"")
    finally:
        probe.unlink(missing_ok=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # something else wrote there meanwhile: leave it
                break
    return path


def hold_run_folder(folder: str | Path) -> Any:
    """Hold ``<folder>/.run.lock`` while a run writes the folder, so that a second run into it refuses at once
    instead of mixing its files and checkpoints with the first one's. The lock goes with its process, even on
    ``kill -9``; the empty file stays. Returns the held lock: ``release()`` it when the run ends."""
    from filelock import FileLock, Timeout

    from pipeline.common.errors import RunBusyError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / RUN_LOCK), is_singleton=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunBusyError(f"another run is writing {folder} now (it holds {lock.lock_file}); let it finish, "
                           "or choose another --out") from None
    return lock
