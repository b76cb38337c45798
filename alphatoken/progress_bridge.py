"""Progress bars for the library's long loops, through `alphatoken.progress` when it is there."""
from __future__ import annotations

import sys


def progress(iterable, desc: str, total=None, enabled=None):
    try:
        from .progress import progress as bar
    except ImportError:  # pragma: no cover - the CLI module ships with the package
        bar = None
    if bar is not None:
        return bar(iterable, desc=desc, total=total, enabled=enabled)
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total)
