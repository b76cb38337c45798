"""Plain-PyTorch references for every kernel: the math of DESIGN §3/§6, in a few lines each.

These are the truth the Triton kernels are tested against and the CPU fallback the gate picks when Triton
cannot run. Inputs: row-matched token matrices `a (N, d_in)` and `g (N, d_out)`; results are float32 (N,).
"""
from __future__ import annotations

import torch


def _common(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """float32 for fp32/bf16/fp16 inputs; float64 when any input is float64 (exact checks)."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return [t.to(dtype) for t in tensors]


def bilinear_reference(a: torch.Tensor, g: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """`out[k, t] = g_tᵀ M_k a_t` for `M (K, d_out, d_in)`; returns (K, N).

    Written as `rowsum((a M_kᵀ) ⊙ g)`: one matrix product per k, about twice as fast on CPU as a
    three-operand einsum (this is the CPU path of the library, not only the tests' truth).
    """
    a, g, M = _common(a, g, M)
    return torch.stack([((a @ m.T) * g).sum(dim=1) for m in M]) if M.shape[0] else a.new_zeros(0, a.shape[0])


def fisher_norm_reference(a: torch.Tensor, g: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """`out[t] = (g_t⊙g_t)ᵀ F (a_t⊙a_t) = ⟨F, (g_t a_tᵀ)²⟩`; returns (N,)."""
    a, g, F = _common(a, g, F)
    return (((a * a) @ F.T) * (g * g)).sum(dim=1)


def ghost_dot_reference(a: torch.Tensor, g: torch.Tensor, a_ref: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """`out[t] = Σ_v (g_t·g'_v)(a_t·a'_v) = g_tᵀ (G'ᵀA') a_t`; returns (N,)."""
    a, g, a_ref, g_ref = _common(a, g, a_ref, g_ref)
    return ((g @ g_ref.T) * (a @ a_ref.T)).sum(dim=1)


def materialize_reference(a_ref: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """`G'ᵀA'`: the (d_out, d_in) matrix `Σ_v g'_v a'_vᵀ`, in float32."""
    g_ref, a_ref = _common(g_ref, a_ref)
    return g_ref.T @ a_ref


def head_rows_reference(z: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, scale: float = 1.0,
                        softcap=None, with_grad: bool = True):
    """One chunk of the LM head's loss rows, y = T(z) (s·z, or c·tanh(s·z/c) with a soft-cap c):
    `ℓ_t = logsumexp(y_t) − y_t[target_t]` and `g_t = w_t (softmax(y_t) − onehot(target_t)) ⊙ T'(z_t)`.

    z (n, V) fp32/fp64 (fp16/bf16 go to fp32); returns (ℓ (n,), g (n, V) or None) in that dtype. This is also
    the CPU path, so it works in place: z is consumed (g is written over it) and no (n, V) temporary is made
    beyond tanh(·) under a soft-cap.
    """
    z = z if z.dtype in (torch.float32, torch.float64) else z.float()
    th = None
    if softcap is not None:
        th = torch.tanh(z.mul_(scale / softcap))  # y = c·th, T'(z) = s·(1 − th²)
        y = torch.mul(th, softcap, out=z)
    else:
        y = z.mul_(scale) if scale != 1.0 else z
    rows = torch.arange(y.shape[0], device=y.device)
    y_target = y[rows, targets]
    top = y.amax(dim=1, keepdim=True)
    p = y.sub_(top).exp_()  # exp(y − max), in place
    total = p.sum(dim=1)
    lse = top.squeeze(1) + total.log()
    nll = lse - y_target
    if not with_grad:
        return nll, None
    g = p.mul_((weights.to(p.dtype) / total).unsqueeze(1))  # w · softmax
    g[rows, targets] -= weights.to(g.dtype)  # − w · onehot
    if th is not None:
        g.mul_(th.square_().neg_().add_(1.0))
    if scale != 1.0:
        g.mul_(scale)
    return nll, g
