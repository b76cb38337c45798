"""The one place that decides where a kernel call runs.

* any float64 operand                   -> the plain-PyTorch reference, in float64 (exact checks, CPU
                                           studies: float64 is outside the Triton kernels' dtypes);
* CUDA tensors                          -> compiled Triton;
* CPU tensors with `TRITON_INTERPRET=1` -> the Triton kernels in Triton's interpreter (set before import);
* otherwise                             -> the plain-PyTorch reference.

`ALPHATOKEN_KERNELS=reference` (or `use_backend("reference")`) forces the reference everywhere, e.g. to
compare, or to keep long CPU tests off the interpreter. Call sites never test devices themselves.

The forced backend lives in a `contextvars.ContextVar`, so two threads (or two asyncio tasks) do not see each
other's `use_backend`. Autograd may run backward hooks and `Function.backward` on a worker thread (one per CUDA
device), which starts from an empty context: the capture session (`alphatoken.hooks`) and the chunked head loss
(`alphatoken.head_loss`) therefore run their kernel calls in a copy of the context the step was started in.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Optional

import torch

try:  # Triton is optional on machines without a Linux GPU stack.
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except Exception:  # pragma: no cover - depends on the install
    TRITON_AVAILABLE = False

BACKENDS = ("auto", "triton", "reference")
_FORCED: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("alphatoken_kernel_backend", default=None)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> str:
    forced = _FORCED.get()
    if forced is not None:
        return forced
    choice = os.environ.get("ALPHATOKEN_KERNELS", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"ALPHATOKEN_KERNELS must be one of {BACKENDS}, got {choice!r}")
    return choice


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype of a kernel call's results: float64 when any operand is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def backend_for(*tensors: torch.Tensor) -> str:
    """'triton' (compiled or interpreted) or 'reference' for a call on these tensors."""
    choice = requested_backend()
    if choice == "reference" or not TRITON_AVAILABLE:
        return "reference"
    if result_dtype(*tensors) == torch.float64:
        if choice == "triton":
            raise RuntimeError(
                "ALPHATOKEN_KERNELS=triton but an operand is float64, which only the reference computes: "
                "cast the operands to float32, bfloat16 or float16"
            )
        return "reference"
    on_cuda = all(t.is_cuda for t in tensors)
    if on_cuda and not interpreter_enabled():
        return "triton"
    if not any(t.is_cuda for t in tensors) and interpreter_enabled():
        return "triton"
    if choice == "triton":
        raise RuntimeError(
            "ALPHATOKEN_KERNELS=triton but Triton cannot run on these tensors: use CUDA tensors, "
            "or CPU tensors with TRITON_INTERPRET=1 set before import"
        )
    return "reference"


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend ('auto', 'triton', 'reference') inside a `with` block."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)
