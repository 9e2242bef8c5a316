"""One progress bar for every long loop (extraction blocks, training epochs), on stderr."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def progress_bar(iterable: Iterable | None = None, *, total: int, desc: str, unit: str, enabled: bool,
                 leave: bool = True, initial: int = 0) -> Any:
    """A tqdm bar that stays out of stdout (where the CLI prints results) and can be switched off.

    Into a log rather than a terminal (CI, `dvc repro > log`), it writes a line at most every 30 s:
    redrawn bars would otherwise fill a log with tens of kilobytes of carriage returns.
    """
    from tqdm.auto import tqdm

    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, leave=leave,
                file=sys.stderr, dynamic_ncols=True, mininterval=interval)


def close_bars() -> None:
    """Close every bar still open, so that a message printed after an error or Ctrl-C starts a line of its own and
    no bar redraws itself after it."""
    std = sys.modules.get("tqdm.std")  # no bar was ever made without it
    if std is not None:
        for bar in list(getattr(std.tqdm, "_instances", ())):
            bar.close()
