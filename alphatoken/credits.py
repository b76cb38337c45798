"""Per-layer values of token credits C_t = g_t a_tᵀ (DESIGN §3), through alphatoken.kernels.

Every dtype goes through the kernels' launchers; where a call runs (Triton, the interpreter, or the
reference, which is also what computes float64) is decided by `kernels/gate.py` alone.

For one layer with response rows a (N, d_in), g (N, d_out):
    adaptation_t = η ⟨C_t, U⟩                        = η g_tᵀ U a_t
    stability_t  = η gᵀ(F ⊙ Δ)a − ½ η² (g⊙g)ᵀ F (a⊙a)            ("diag")
                 = η (g⊙f_out)ᵀ Δ (a⊙f_in) − ½ η² (g²·f_out)(a²·f_in)   ("kfac")
U is either materialized (d_out, d_in) or kept as factors (A', G', scale): then g_tᵀ U a_t is a ghost dot.
For an Embedding, a_t is the one-hot of token id x_t, so every product becomes a column gather.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from alphatoken import kernels as K


@dataclass
class Direction:
    """A target direction U = scale · G'ᵀA' for one layer: materialized (`matrix` = G'ᵀA', (d_out, d_in)) or
    kept as the factors `a_ref`, `g_ref`."""

    matrix: Optional[torch.Tensor] = None
    a_ref: Optional[torch.Tensor] = None
    g_ref: Optional[torch.Tensor] = None
    scale: float = 1.0

    @classmethod
    def from_rows(cls, a_ref: torch.Tensor, g_ref: torch.Tensor, scale: float) -> "Direction":
        """Ghost factors when cheaper than the matrix (the kernels' cost rule), else the matrix."""
        a_ref, g_ref = matched(a_ref, g_ref)
        if K.use_ghost(a_ref.shape[0], a_ref.shape[1], g_ref.shape[1]):
            return cls(a_ref=a_ref, g_ref=g_ref, scale=scale)
        matrix = g_ref.T @ a_ref  # the scale is applied to the values, not to this weight-sized matrix
        return cls(matrix=matrix if matrix.dtype == torch.float64 else matrix.float(), scale=scale)


def add_directions(first: Direction, second: Direction, weight: float) -> Direction:
    """first + weight · second, exactly: the factors stacked (each side's scale moved into its g rows) when both
    are kept as factors, else the sum of the two (scaled) matrices."""
    if first.matrix is None and second.matrix is None:
        a1, g1 = matched(first.a_ref, first.g_ref)
        a2, g2 = matched(second.a_ref, second.g_ref)
        dtype = torch.promote_types(a1.dtype, a2.dtype)
        a = torch.cat([a1.to(dtype), a2.to(dtype)])
        g = torch.cat([g1.to(dtype) * first.scale, g2.to(dtype) * (second.scale * weight)])
        return Direction.from_rows(a, g, 1.0)

    m1, m2 = dense_direction(first), dense_direction(second)
    dtype = torch.promote_types(m1.dtype, m2.dtype)
    return Direction(matrix=m1.to(dtype) + weight * m2.to(dtype), scale=1.0)


def dense_direction(direction: Direction) -> torch.Tensor:
    """scale · U of one layer as a matrix (the factors multiplied out when U is kept as factors)."""
    if direction.matrix is not None:
        return direction.matrix * direction.scale
    a, g = matched(direction.a_ref, direction.g_ref)
    return (g.T @ a) * direction.scale


def direction_square_norm(direction: Direction) -> torch.Tensor:
    """‖U‖²_F in float64: ‖scale·M‖² for a matrix; for factors, scale²·Σ_ij (a_i·a_j)(g_i·g_j) (the Gram
    form, no weight-sized matrix), in row blocks."""
    scale = float(direction.scale)
    if direction.matrix is not None:
        return scale * scale * direction.matrix.double().square().sum()
    a, g = direction.a_ref.double(), direction.g_ref.double()
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[0], 1024):
        total = total + ((a[start:start + 1024] @ a.T) * (g[start:start + 1024] @ g.T)).sum()
    return scale * scale * total


def matched(a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels take a and g in one dtype: mixed precision (autocast) goes to float32."""
    if a.dtype != g.dtype:
        return a.float(), g.float()
    return a, g


def linear_values(a, g, eta: float, direction: Optional[Direction], fisher, delta: Optional[torch.Tensor]):
    """(adaptation (N,), stability (N,)) for a Linear/Conv1D layer. fisher: None, ("diag", F), ("kfac", fo, fi)."""
    a, g = matched(a, g)
    n = a.shape[0]
    acc_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    zero = torch.zeros(n, dtype=acc_dtype, device=a.device)
    adaptation, stability = zero, zero.clone()
    matrices, slots = [], {}
    if direction is not None and direction.matrix is not None:
        slots["u"] = len(matrices)
        matrices.append(direction.matrix)
    kind = fisher[0] if fisher is not None else None
    if kind == "diag" and delta is not None:
        slots["drift"] = len(matrices)
        matrices.append(fisher[1] * delta)

    forms = None
    if kind == "diag":
        if matrices:
            forms, norm = K.bilinear_fisher_norm(a, g, matrices, fisher[1])
        else:
            norm = K.fisher_norm(a, g, fisher[1])
        stability = stability - 0.5 * eta * eta * norm
    elif matrices:
        forms = K.bilinear(a, g, matrices)
    if kind == "kfac":
        f_out, f_in = fisher[1], fisher[2]
        g32, a32 = g.to(acc_dtype), a.to(acc_dtype)
        f_out, f_in = f_out.to(acc_dtype), f_in.to(acc_dtype)
        norm = ((g32 * g32) @ f_out) * ((a32 * a32) @ f_in)
        stability = stability - 0.5 * eta * eta * norm
        if delta is not None:
            stability = stability + eta * K.bilinear(a32 * f_in, g32 * f_out, delta.to(acc_dtype))
    if "drift" in slots:
        stability = stability + eta * forms[slots["drift"]]
    if "u" in slots:
        adaptation = eta * direction.scale * forms[slots["u"]]
    elif direction is not None:
        adaptation = eta * direction.scale * K.ghost_dot(a, g, *matched(direction.a_ref, direction.g_ref))
    return adaptation, stability


def embedding_direction(ids_ref: torch.Tensor, g_ref: torch.Tensor, vocab: int, scale: float) -> Direction:
    """U for an Embedding, kept transposed as (vocab, d): row x holds Σ_{v: x_v = x} g'_v · scale."""
    dtype = torch.float64 if g_ref.dtype == torch.float64 else torch.float32
    u_t = torch.zeros(vocab, g_ref.shape[1], dtype=dtype, device=g_ref.device)
    u_t.index_add_(0, ids_ref, g_ref.to(dtype))
    return Direction(matrix=u_t, scale=scale)


def embedding_values(ids, g, eta: float, direction: Optional[Direction], fisher, delta_t: Optional[torch.Tensor]):
    """(adaptation, stability) for an Embedding; `delta_t` and "diag" F come transposed as (vocab, d)."""
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    g = g.to(dtype)
    adaptation = torch.zeros(ids.shape[0], dtype=dtype, device=g.device)
    stability = torch.zeros_like(adaptation)
    if direction is not None:
        adaptation = eta * direction.scale * (g * direction.matrix[ids]).sum(1)
    if fisher is not None:
        if fisher[0] == "diag":
            f_rows = fisher[1].T[ids].to(dtype)
            stability = stability - 0.5 * eta * eta * (g * g * f_rows).sum(1)
            if delta_t is not None:
                stability = stability + eta * (g * f_rows * delta_t[ids].to(dtype)).sum(1)
        else:
            f_out, f_in = fisher[1].to(dtype), fisher[2].to(dtype)
            stability = stability - 0.5 * eta * eta * ((g * g) @ f_out) * f_in[ids]
            if delta_t is not None:
                stability = stability + eta * ((g * f_out) * delta_t[ids].to(dtype)).sum(1) * f_in[ids]
    return adaptation, stability
