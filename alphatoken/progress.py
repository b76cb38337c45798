"""One progress-bar helper for scoring, Fisher estimation and training.

    for batch in progress(batches, "fisher", total=len(batches)):
        ...

Bars go to stderr and only when stderr is a terminal (so logs, pipes and CI stay clean). Override with
`enabled=True/False` per call, or for the whole process with `ALPHATOKEN_PROGRESS=1` / `0` (or
`set_progress(True/False)`, which the CLI's `--quiet` uses). tqdm is imported lazily.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Optional

_forced: Optional[bool] = None


def set_progress(enabled: Optional[bool]) -> None:
    """Force bars on (True) or off (False) process-wide; None returns to the terminal check."""
    global _forced
    _forced = enabled


def progress_enabled(enabled: Optional[bool] = None) -> bool:
    """Whether a bar would be shown: an explicit `enabled`, else set_progress, else the env, else a TTY."""
    if enabled is not None:
        return bool(enabled)
    if _forced is not None:
        return _forced
    env = os.environ.get("ALPHATOKEN_PROGRESS", "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class _NullBar:
    """What `progress(None, ...)` returns when bars are off: the tqdm methods the library uses, doing nothing."""

    def __init__(self, iterable=None):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Optional[Iterable], desc: str, total: Optional[int] = None, enabled: Optional[bool] = None):
    """Wrap `iterable` in a tqdm bar labelled `desc` (or return it unchanged when bars are off).

    With `iterable=None` it returns a bar to drive by hand (`bar.update(n)`, `bar.set_postfix(...)`,
    `bar.close()`; also a context manager), a no-op object when bars are off.
    """
    if not progress_enabled(enabled):
        return _NullBar() if iterable is None else iterable
    from tqdm.auto import tqdm

    if total is None and iterable is not None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True, leave=False)
