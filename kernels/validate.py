"""Input checks shared by the launchers: errors name the argument and the shape (or dtype, device) expected.

Dtype policy: the row-matched token matrices of one call (`a` and `g`; `a_ref` and `g_ref`) must share one
dtype among fp32, bf16 and fp16 (or float64, which the gate sends to the exact reference) — a mismatch there is almost always a capture bug, so it raises rather than
silently casting. Weight-shaped operands (M, F) and the reference rows may use any of the three dtypes
independently of `a` (U and the Fisher are commonly kept in fp32 beside bf16 activations); the kernels then
upcast tiles to fp32 in registers. The K matrices of one list share a base pointer in the kernel, so a list
of mixed dtypes is promoted to fp32 by the launcher (a copy of the non-fp32 ones; give one dtype to avoid it).
"""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_NAMES = "float32, bfloat16, float16 or float64 (float64 runs on the reference)"


def _check_tensor(name: str, t, expected: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {expected}, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D with shape {expected}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be {_NAMES} with shape {expected}, got {t.dtype}")


def check_rows(a: torch.Tensor, g: torch.Tensor, *, names=("a", "g")) -> tuple[int, int, int]:
    """Check `a (N, d_in)` and `g (N, d_out)`: 2-D, one float dtype, one device; return (N, d_in, d_out)."""
    _check_tensor(names[0], a, "(N, d_in)")
    _check_tensor(names[1], g, "(N, d_out)")
    if a.shape[0] != g.shape[0]:
        raise ValueError(
            f"{names[1]} must have the same number of rows as {names[0]}: expected shape ({a.shape[0]}, d_out), "
            f"got {tuple(g.shape)}"
        )
    if g.dtype != a.dtype:
        raise ValueError(
            f"{names[1]} must have the dtype of {names[0]} ({a.dtype}) with shape ({a.shape[0]}, d_out), "
            f"got {g.dtype}; cast one of them"
        )
    if a.device != g.device:
        raise ValueError(
            f"{names[1]} (shape ({a.shape[0]}, d_out)) is on {g.device} but {names[0]} is on {a.device}"
        )
    return a.shape[0], a.shape[1], g.shape[1]


def check_refs(a: torch.Tensor, g: torch.Tensor, a_ref: torch.Tensor, g_ref: torch.Tensor) -> tuple[int, int, int, int]:
    """Check the ghost operands: `a (N, d_in)`, `g (N, d_out)`, `a_ref (V, d_in)`, `g_ref (V, d_out)`.

    Returns (N, V, d_in, d_out).
    """
    N, d_in, d_out = check_rows(a, g)
    _check_tensor("a_ref", a_ref, f"(V, d_in) = (V, {d_in})")
    _check_tensor("g_ref", g_ref, f"(V, d_out) = (V, {d_out})")
    if a_ref.shape[1] != d_in:
        raise ValueError(f"a_ref must have shape (V, d_in) = (V, {d_in}) to match a, got {tuple(a_ref.shape)}")
    V = a_ref.shape[0]
    if tuple(g_ref.shape) != (V, d_out):
        raise ValueError(
            f"g_ref must have shape (V, d_out) = ({V}, {d_out}) to match a_ref and g, got {tuple(g_ref.shape)}"
        )
    if g_ref.dtype != a_ref.dtype:
        raise ValueError(f"g_ref must have the dtype of a_ref ({a_ref.dtype}) with shape ({V}, {d_out}), got {g_ref.dtype}")
    for name, t, shape in (("a_ref", a_ref, (V, d_in)), ("g_ref", g_ref, (V, d_out))):
        if t.device != a.device:
            raise ValueError(f"{name} (shape {shape}) is on {t.device} but a is on {a.device}")
    return N, V, d_in, d_out


def check_matrix(name: str, M, d_out: int, d_in: int, device: torch.device, dims=(2, 3)) -> None:
    """Check a (d_out, d_in) matrix (or, with 3 in `dims`, a (K, d_out, d_in) stack)."""
    expected = f"(d_out, d_in) = ({d_out}, {d_in})" if dims == (2,) else f"(d_out, d_in) = ({d_out}, {d_in}) or (K, {d_out}, {d_in})"
    if not isinstance(M, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {expected}, got {type(M).__name__}")
    if M.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be {_NAMES} with shape {expected}, got {M.dtype}")
    if M.dim() not in dims or tuple(M.shape[-2:]) != (d_out, d_in):
        raise ValueError(f"{name} must have shape {expected}, got {tuple(M.shape)}")
    if M.device != device:
        raise ValueError(f"{name} (shape {expected}) is on {M.device} but a is on {device}")


def matrix_list(M, d_out: int, d_in: int, device) -> tuple[list[torch.Tensor], bool]:
    """Accept one (d_out, d_in) matrix, a (K, d_out, d_in) stack or a sequence of matrices.

    Returns (list of K 2-D views, was_single). No data is copied.
    """
    if isinstance(M, torch.Tensor):
        check_matrix("M", M, d_out, d_in, device)
        if M.dim() == 2:
            return [M], True
        if M.shape[0] == 0:
            raise ValueError(f"M must hold at least one matrix: expected (K, {d_out}, {d_in}) with K >= 1, got {tuple(M.shape)}")
        return list(M.unbind(0)), False
    if isinstance(M, Sequence) and not isinstance(M, (str, bytes)) and len(M) > 0:
        for k, m in enumerate(M):
            check_matrix(f"M[{k}]", m, d_out, d_in, device, dims=(2,))
        return list(M), False
    raise ValueError(
        f"M must be a ({d_out}, {d_in}) tensor, a (K, {d_out}, {d_in}) stack or a non-empty list of "
        f"({d_out}, {d_in}) tensors, got {type(M).__name__}"
    )

