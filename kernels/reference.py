"""Plain-PyTorch references for every kernel: the math of DESIGN §3/§6, in a few lines each.

These are the truth the Triton kernels are tested against and the CPU fallback the gate picks when Triton
cannot run. Inputs: row-matched token matrices `a (N, d_in)` and `g (N, d_out)`; results are float32 (N,).
"""
from __future__ import annotations

import torch


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def bilinear_reference(a: torch.Tensor, g: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """`out[k, t] = g_tᵀ M_k a_t` for `M (K, d_out, d_in)`; returns (K, N)."""
    a, g, M = _f32(a), _f32(g), _f32(M)
    return torch.einsum("to,koi,ti->kt", g, M, a)


def fisher_norm_reference(a: torch.Tensor, g: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """`out[t] = (g_t⊙g_t)ᵀ F (a_t⊙a_t) = ⟨F, (g_t a_tᵀ)²⟩`; returns (N,)."""
    a, g, F = _f32(a), _f32(g), _f32(F)
    return torch.einsum("to,oi,ti->t", g * g, F, a * a)


def ghost_dot_reference(a: torch.Tensor, g: torch.Tensor, a_ref: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """`out[t] = Σ_v (g_t·g'_v)(a_t·a'_v) = g_tᵀ (G'ᵀA') a_t`; returns (N,)."""
    a, g, a_ref, g_ref = _f32(a), _f32(g), _f32(a_ref), _f32(g_ref)
    return ((g @ g_ref.T) * (a @ a_ref.T)).sum(dim=1)


def materialize_reference(a_ref: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """`G'ᵀA'`: the (d_out, d_in) matrix `Σ_v g'_v a'_vᵀ`, in float32."""
    return _f32(g_ref).T @ _f32(a_ref)
