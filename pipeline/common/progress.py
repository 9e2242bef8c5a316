"""One progress bar for every long loop (extraction blocks, training epochs), on stderr."""

from __future__ import annotations

import sys
from typing import Any, Iterable


def progress_bar(iterable: Iterable | None = None, *, total: int, desc: str, unit: str, enabled: bool,
                 leave: bool = True) -> Any:
    """A tqdm bar that stays out of stdout (where the CLI prints results) and can be switched off."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=leave,
                file=sys.stderr, dynamic_ncols=True)
