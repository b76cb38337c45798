"""Cost-based choice between the ghost form and the materialized form of `g_tᵀ (G'ᵀA') a_t`."""
from __future__ import annotations

import torch

from .bilinear import bilinear
from .ghost_dot import ghost_dot
from .reference import materialize_reference


def use_ghost(n_ref: int, d_in: int, d_out: int) -> bool:
    """Ghost when keeping the factors is cheaper than the matrix: `V (d_in + d_out) < d_in d_out`."""
    return n_ref * (d_in + d_out) < d_in * d_out


def target_dot(a, g, a_ref, g_ref, scale: float = 1.0) -> torch.Tensor:
    """`scale · g_tᵀ (G'ᵀA') a_t` per row, by whichever form costs less."""
    if use_ghost(a_ref.shape[0], a.shape[1], g.shape[1]):
        return ghost_dot(a, g, a_ref, g_ref) * scale
    return bilinear(a, g, materialize_reference(a_ref, g_ref)) * scale
