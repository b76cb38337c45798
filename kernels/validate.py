"""Input checks shared by the launchers: errors name the argument and the shape expected."""
from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_rows(a: torch.Tensor, g: torch.Tensor, *, names=("a", "g")) -> tuple[int, int, int]:
    """Check `a (N, d_in)` and `g (N, d_out)`; return (N, d_in, d_out)."""
    for name, t in zip(names, (a, g)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, d), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if a.shape[0] != g.shape[0]:
        raise ValueError(
            f"{names[1]} must have the same number of rows as {names[0]}: expected ({a.shape[0]}, d_out), "
            f"got {tuple(g.shape)}"
        )
    if a.device != g.device:
        raise ValueError(f"{names[1]} is on {g.device} but {names[0]} is on {a.device}")
    return a.shape[0], a.shape[1], g.shape[1]


def check_matrix(name: str, M: torch.Tensor, d_out: int, d_in: int, device: torch.device) -> None:
    if not isinstance(M, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(M).__name__}")
    if M.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {M.dtype}")
    if tuple(M.shape[-2:]) != (d_out, d_in) or M.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (d_out, d_in) = ({d_out}, {d_in}), got {tuple(M.shape)}")
    if M.device != device:
        raise ValueError(f"{name} is on {M.device} but a is on {device}")


def stack_matrices(M, d_out: int, d_in: int, device) -> tuple[torch.Tensor, bool]:
    """Accept one (d_out, d_in) matrix, a (K, d_out, d_in) stack or a sequence; return (stack, was_single)."""
    if isinstance(M, torch.Tensor):
        check_matrix("M", M, d_out, d_in, device)
        return (M.unsqueeze(0), True) if M.dim() == 2 else (M, False)
    if isinstance(M, Sequence) and len(M) > 0:
        for k, m in enumerate(M):
            check_matrix(f"M[{k}]", m, d_out, d_in, device)
            if m.dim() != 2:
                raise ValueError(f"M[{k}] must be 2-D (d_out, d_in), got {tuple(m.shape)}")
        return torch.stack(list(M)), False
    raise ValueError("M must be a (d_out, d_in) tensor, a (K, d_out, d_in) stack or a non-empty list of them")
