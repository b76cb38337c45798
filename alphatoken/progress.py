"""One progress-bar helper for scoring, Fisher estimation and training.

    for batch in progress(batches, "fisher", total=len(batches)):
        ...

Bars go to stderr and only when stderr is a terminal (so logs, pipes and CI stay clean). Override with
`enabled=True/False` per call, for a block with `forced_progress(True/False)` (which the CLI's `--quiet` uses) or
`set_progress(True/False)`, or for the whole process with `ALPHATOKEN_PROGRESS=1` / `0`. The forced setting lives
in a `contextvars.ContextVar`, as the forced kernel backend does (`alphatoken.kernels.gate`): it holds for the
thread or asyncio task that set it. tqdm is imported lazily.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from typing import Iterable, Iterator, Optional

_FORCED: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("alphatoken_progress", default=None)


def set_progress(enabled: Optional[bool]) -> None:
    """Force bars on (True) or off (False) in the current context; None returns to the env / terminal check."""
    _FORCED.set(enabled)


@contextlib.contextmanager
def forced_progress(enabled: Optional[bool]) -> Iterator[None]:
    """Inside the block, bars are forced on (True), off (False) or left to the env / terminal check (None); the
    previous setting comes back on leaving it."""
    token = _FORCED.set(enabled)
    try:
        yield
    finally:
        _FORCED.reset(token)


def progress_enabled(enabled: Optional[bool] = None) -> bool:
    """Whether a bar would be shown: an explicit `enabled`, else set_progress, else the env, else a TTY."""
    if enabled is not None:
        return bool(enabled)
    forced = _FORCED.get()
    if forced is not None:
        return forced
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
