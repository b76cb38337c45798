"""The masked training loss through the chunked LM head, as an autograd Function (no (rows × V) tensor saved).

    loss = Σ_{t kept} ℓ_t / D,     ℓ_t = logsumexp(T(W a_t + b)) − T(W a_t + b)[y_t]

over the kept rows only (D: the kept count, or `num_items_in_batch`). The forward takes the per-row NLL the
valuation already computed when given (no head GEMM); the backward recomputes each chunk of rows and returns
∂loss/∂a (kept rows), ∂loss/∂W and ∂loss/∂b through `kernels.head_grads`: 3 head GEMMs over the kept rows,
the same as the backward of an unfused head (2 when the rows g_t W are handed in), and one chunk of (rows × V)
values alive at a time.
"""
from __future__ import annotations

import contextvars
from typing import Optional

import torch

from alphatoken import kernels as K

from .head import HeadTransform


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, weight, bias, targets, denom, nll, scale, softcap, chunk_rows, grad_rows):
        if nll is None:
            nll = K.head_nll(a.detach(), weight.detach(), None if bias is None else bias.detach(), targets,
                             scale, softcap, chunk_rows)
        ctx.save_for_backward(a, weight, bias, targets, denom, grad_rows)
        ctx.context = contextvars.copy_context()  # the backward may run on an autograd worker thread
        ctx.meta = (scale, softcap, chunk_rows)
        total = nll.sum()
        return total / denom.to(total.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        return ctx.context.copy().run(_ChunkedHeadLoss._backward, ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        a, weight, bias, targets, denom, grad_rows = ctx.saved_tensors
        scale, softcap, chunk_rows = ctx.meta
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        coef = (grad_out.to(acc) / denom.to(acc)).expand(a.shape[0])
        need_a, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        reuse = need_a and grad_rows is not None
        grad_a, grad_w, grad_b = K.head_grads(a, weight, bias, targets, coef, scale, softcap, chunk_rows,
                                              need_a=need_a and not reuse, need_w=need_w, need_b=need_b)
        if reuse:  # ∂ℓ_t/∂a_t = g_t W, already computed by the valuation (the seed of its backward)
            grad_a = (grad_rows.to(acc) * coef.unsqueeze(1)).to(a.dtype)
        return grad_a, grad_w, grad_b, None, None, None, None, None, None, None


def chunked_head_loss(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                      denom: torch.Tensor, transform: HeadTransform = HeadTransform(),
                      nll: Optional[torch.Tensor] = None, chunk_rows: Optional[int] = None,
                      grad_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_t ℓ_t / denom over the rows of `a (k, d)` (the kept head-input rows, in the graph), W (V, d), b (V,).

    targets (k,) token ids; denom: a tensor (kept count or num_items_in_batch; no host read); nll (k,): the
    rows' NLL if already known (detached), else computed here chunk by chunk. grad_rows (k, d): ∂ℓ_t/∂a_t = g_t W
    if already known (the valuation's seed rows), which saves the backward one head GEMM. Gradients reach a, W
    and b.
    """
    if a.dim() != 2 or weight.dim() != 2 or a.shape[1] != weight.shape[1]:
        raise ValueError(f"a must be (k, d) and weight (V, d), got {tuple(a.shape)} and {tuple(weight.shape)}")
    if targets.shape != (a.shape[0],):
        raise ValueError(f"targets must be ({a.shape[0]},), got {tuple(targets.shape)}")
    if not isinstance(denom, torch.Tensor):
        denom = torch.tensor(float(denom), device=a.device)
    nll = None if nll is None else nll.detach()
    if grad_rows is not None and tuple(grad_rows.shape) != tuple(a.shape):
        raise ValueError(f"grad_rows must have the shape of a {tuple(a.shape)}, got {tuple(grad_rows.shape)}")
    return _ChunkedHeadLoss.apply(a, weight, bias, targets, denom, nll, transform.scale, transform.softcap,
                                  chunk_rows, None if grad_rows is None else grad_rows.detach())
