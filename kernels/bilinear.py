"""Bilinear forms and Fisher norms over token rows (provisional: reference until the Triton kernels land)."""
from __future__ import annotations

import torch

from .reference import bilinear_reference, fisher_norm_reference
from .validate import check_matrix, check_rows, stack_matrices


def bilinear(a: torch.Tensor, g: torch.Tensor, M) -> torch.Tensor:
    """`g_tᵀ M a_t` per row: (N,) for one M, (K, N) for a stack or list of K matrices."""
    _, d_in, d_out = check_rows(a, g)
    stack, single = stack_matrices(M, d_out, d_in, a.device)
    out = bilinear_reference(a, g, stack).float()
    return out[0] if single else out


def fisher_norm(a: torch.Tensor, g: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """`(g_t⊙g_t)ᵀ F (a_t⊙a_t)` per row: (N,)."""
    _, d_in, d_out = check_rows(a, g)
    check_matrix("F", F, d_out, d_in, a.device)
    return fisher_norm_reference(a, g, F).float()


def bilinear_fisher_norm(a: torch.Tensor, g: torch.Tensor, M, F: torch.Tensor):
    """Both `bilinear(a, g, M)` and `fisher_norm(a, g, F)` from one pass over a and g."""
    return bilinear(a, g, M), fisher_norm(a, g, F)
