"""Cost-based choice between the ghost form and the materialized form of `g_tᵀ (G'ᵀA') a_t` (DESIGN §3, §6).

Ghost: `ghost_dot` streams the V reference rows: 2·N·V·(d_in + d_out) FLOPs, (N + V)·(d_in + d_out) reads.
Materialized: one GEMM `G'ᵀA'` (2·V·d_in·d_out FLOPs, a d_out·d_in fp32 matrix) and then `bilinear`
(2·N·d_in·d_out FLOPs). Per token row the ghost form costs V·(d_in + d_out) and the materialized form
d_in·d_out, hence the rule: ghost when `V·(d_in + d_out) < d_in·d_out`. The materialization is a plain
GEMM, left to torch (cuBLAS); a caller that reuses one target across batches should materialize once
(`materialize_reference`) and call `bilinear` itself.
"""
from __future__ import annotations

import torch

from .bilinear import bilinear
from .ghost_dot import ghost_dot
from .reference import materialize_reference
from .validate import check_refs

FORMS = ("ghost", "materialized")


def use_ghost(n_ref: int, d_in: int, d_out: int) -> bool:
    """Ghost when keeping the factors is cheaper than the matrix: `V (d_in + d_out) < d_in d_out`."""
    return n_ref * (d_in + d_out) < d_in * d_out


def target_dot(a, g, a_ref, g_ref, scale: float = 1.0, *, form: str | None = None) -> torch.Tensor:
    """`scale · g_tᵀ (G'ᵀA') a_t` per row: (N,) fp32, by whichever form costs less.

    a (N, d_in), g (N, d_out), a_ref (V, d_in), g_ref (V, d_out). `form` ('ghost' or 'materialized') forces
    one side (tests, benchmarks); default: `use_ghost(V, d_in, d_out)`. Accumulated in fp32.
    FLOPs ≈ 2·N·V·(d_in + d_out) (ghost) or 2·V·d_in·d_out + 2·N·d_in·d_out (materialized); bytes ≈
    (N + V)·(d_in + d_out)·s (ghost) or that plus 8·d_out·d_in for the fp32 matrix (materialized).
    """
    _, V, d_in, d_out = check_refs(a, g, a_ref, g_ref)
    if form is None:
        form = "ghost" if use_ghost(V, d_in, d_out) else "materialized"
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS} or None, got {form!r}")
    if form == "ghost":
        result = ghost_dot(a, g, a_ref, g_ref)
    else:
        result = bilinear(a, g, materialize_reference(a_ref, g_ref))
    return result if scale == 1.0 else result.mul_(scale)
