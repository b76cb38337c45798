"""Launch plumbing shared by the kernel files: block sizes, the reduction split, and a launch counter.

Block sizes
    Each op has a small list of `triton.Config`s. On CUDA the launcher runs the op's `triton.autotune`
    wrapper over that list, keyed on `(n_bucket, D_IN, D_OUT)` where `n_bucket` is N rounded up to a power
    of two (N changes every batch; retuning per exact N would be wasteful). Under the interpreter, and on
    CUDA when `ALPHATOKEN_AUTOTUNE=0`, the op's single `DEFAULT` config runs (autotuning there only burns
    time). `kernel_config(op, ...)` fixes the block sizes (and the split) for a `with` block: tests use it
    to force several blocks and splits on small shapes, benchmarks to sweep configs.

Reduction split
    One program owns a block of rows and loops over the whole reduction (d_out for the bilinear forms, V for
    ghost dots), keeping its row sums in registers and writing each result once: no atomics, so a given
    config is bitwise deterministic run to run. When there are too few row blocks to fill the GPU
    (`cdiv(N, 64) < #SMs`), the reduction is cut into `split` contiguous slices on a second grid axis; each
    slice writes its own partial row into a (split, ..., N) buffer that one `torch.sum` adds up, still in a
    fixed order. Slices are multiples of `unit` (the largest reduction block among the configs) so every
    config tiles them exactly.

Launch counter
    `launch_counts()` counts the Triton kernels launched per op since `reset_launch_counts()`; a call that
    the gate sends to the PyTorch reference does not count. Tests use it to prove the Triton path ran.
    An empty batch (N = 0) is launched too, on an empty grid (Triton's driver starts no program), so every
    call the gate sends to Triton counts once; it uses the fixed config (nothing to tune on zero rows).

State
    The launch counter and the `kernel_config` overrides live in `contextvars` (see `gate.py` for the
    autograd worker-thread caveat): `reset_launch_counts()` starts a fresh counter in the current context, and
    a context copied from it (a thread started with `copy_context().run`, the capture session's callbacks)
    counts into the same one. The autotuned kernel wrappers (`_TUNED`) are a process-wide cache.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import os
from typing import Callable

import torch

try:
    import triton
except Exception:  # pragma: no cover - Triton is optional; the gate then always answers 'reference'
    triton = None

_DEFAULT_COUNTS: collections.Counter = collections.Counter()  # until a context calls reset_launch_counts()
_COUNTS: contextvars.ContextVar[collections.Counter] = contextvars.ContextVar("alphatoken_launch_counts")
_OVERRIDES: contextvars.ContextVar[dict] = contextvars.ContextVar("alphatoken_kernel_config", default={})
_TUNED: dict[str, object] = {}

# Rows per program assumed when sizing the split; the true BLOCK_N is the autotuner's choice.
_SPLIT_ROWS = 64


def launch_counts() -> dict[str, int]:
    """Triton kernel launches per op name since the last `reset_launch_counts()`."""
    return dict(_COUNTS.get(_DEFAULT_COUNTS))


def reset_launch_counts() -> None:
    _COUNTS.set(collections.Counter())


def count_launch(op: str) -> None:
    """One more Triton launch of `op` in the current context's counter."""
    _COUNTS.get(_DEFAULT_COUNTS)[op] += 1


@contextlib.contextmanager
def kernel_config(op: str, **meta):
    """Fix the block sizes of `op` ('bilinear' or 'ghost_dot') inside a `with` block; skips autotuning.

    `meta` holds the op's BLOCK_* sizes (all of them), optionally `num_warps`, `num_stages`, and `split`
    (the number of reduction slices; default: the launcher's choice).
    """
    token = _OVERRIDES.set({**_OVERRIDES.get(), op: dict(meta)})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def autotune_enabled() -> bool:
    return os.environ.get("ALPHATOKEN_AUTOTUNE", "1") != "0"


def n_bucket(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_split(op: str, device: torch.device, n_rows: int, red_len: int, unit: int) -> tuple[int, int]:
    """(split, slice_len): how many reduction slices, and the length of each (a multiple of `unit`)."""
    forced = _OVERRIDES.get().get(op, {}).get("split")
    if forced is not None:
        split = max(1, int(forced))
    elif device.type == "cuda":
        row_blocks = cdiv(max(n_rows, 1), _SPLIT_ROWS)
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        split = 1 if row_blocks >= sms else cdiv(sms, row_blocks)
    else:
        split = 1
    split = max(1, min(split, cdiv(max(red_len, 1), unit)))
    slice_len = cdiv(cdiv(max(red_len, 1), split), unit) * unit
    return cdiv(max(red_len, 1), slice_len), slice_len


def reduction_unit(op: str, configs, default: dict, block_name: str) -> int:
    """The slice granularity: the fixed config's block, or the largest block among the autotune configs."""
    meta = _OVERRIDES.get().get(op)
    if meta is not None:
        return meta[block_name]
    if _use_fixed(op, "cuda"):
        return default[block_name]
    return max(c.kwargs[block_name] for c in configs)


def _use_fixed(op: str, device_type: str) -> bool:
    return op in _OVERRIDES.get() or device_type != "cuda" or not autotune_enabled()


def run(op: str, kernel, configs, default: dict, grid: Callable[[dict], tuple], device: torch.device, **args):
    """Launch `kernel` with a fixed config (interpreter / override / autotune off) or autotuned on CUDA."""
    if _use_fixed(op, device.type) or args.get("N") == 0:  # zero rows: nothing to tune, keep the cache clean
        meta = dict(_OVERRIDES.get().get(op, default))
        meta.pop("split", None)
        kernel[grid(meta)](**args, **meta)
    else:
        tuned = _TUNED.get(op)
        if tuned is None:
            tuned = _TUNED[op] = triton.autotune(configs=configs, key=["n_bucket", "D_IN", "D_OUT"])(kernel)
        tuned[grid](**args)
    count_launch(op)


def new_output(shape, device, out: torch.Tensor | None = None, name: str = "out",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The result buffer (float32; float64 for the reference's float64 calls): `out` after checks, else a
    fresh one filled with NaN.

    The NaN fill (4 bytes a result, negligible next to the kernel) makes any element the kernel failed to
    write visible instead of silently holding stale memory.
    """
    shape = tuple(shape)
    if out is None:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{name} must have shape {shape}, got {got}")
    if out.dtype != dtype:
        raise ValueError(f"{name} must be {str(dtype).replace('torch.', '')} with shape {shape}, got {out.dtype}")
    if out.device != device:
        raise ValueError(f"{name} (shape {shape}) is on {out.device} but a is on {device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous with shape {shape}")
    return out
