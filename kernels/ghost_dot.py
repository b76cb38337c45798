"""Ghost dot-products against a reference set of rows (provisional: reference until the Triton kernel lands)."""
from __future__ import annotations

import torch

from .reference import ghost_dot_reference
from .validate import check_rows


def ghost_dot(a: torch.Tensor, g: torch.Tensor, a_ref: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """`Σ_v (g_t·g'_v)(a_t·a'_v)` per row t: (N,)."""
    check_rows(a, g)
    check_rows(a_ref, g_ref, names=("a_ref", "g_ref"))
    return ghost_dot_reference(a, g, a_ref, g_ref).float()
