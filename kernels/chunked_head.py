"""The LM head over response rows in chunks: NLL and w·(softmax − onehot) without a (rows × vocab) tensor.

For head-input rows `a (n, d)`, the head weight `W (V, d)` (bias `b (V,)` optional), targets `y (n,)` and
row weights `w (n,)`, with the model's post-head map `T` (identity, a scale `s`, or a soft-cap `c·tanh(s·z/c)`):

    z_t   = W a_t + b                    head output row (V,)
    ℓ_t   = logsumexp(T(z_t)) − T(z_t)[y_t]
    g_t   = w_t (softmax(T(z_t)) − onehot(y_t)) ⊙ T'(z_t)      = ∂(Σ_t w_t ℓ_t)/∂z_t

`head_chunks` yields (rows, ℓ, g) one chunk of rows at a time; the chunk's `g` lives only until the next one
(the caller uses it at once: seed rows g W, U += gᵀa, bilinear forms). `head_nll` gives ℓ alone and
`head_grads` the gradients of Σ_t c_t ℓ_t with respect to a, W and b, recomputing each chunk (the backward of
a fused loss). Peak extra memory: one chunk of `chunk_rows × V` fp32 values (plus what the caller does with it).

`head_rows` is the per-chunk step from z to (ℓ, g), in place in z: a Triton kernel where the gate allows
(`_head_rows_kernel`, one program per row, two passes over the vocabulary), else `head_rows_reference`.
The GEMMs around it (z = a Wᵀ, g W, gᵀ a) are left to torch (cuBLAS on a GPU).
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .gate import backend_for
from .launch import count_launch
from .reference import head_rows_reference

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None

# Rows per chunk: enough to keep the head GEMM efficient, few enough that a chunk stays near this many bytes.
CHUNK_BYTES = 64 << 20
MIN_CHUNK_ROWS = 32
BLOCK_V = 1024  # vocabulary tile of the row kernel (fixed: the kernel is bandwidth-bound)
INTERPRETER_BLOCK_V = 64


def chunk_rows_for(n: int, vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk: `chunk_bytes // (4·V)`, at least MIN_CHUNK_ROWS, at most n (and at least 1)."""
    return max(1, min(max(n, 1), max(MIN_CHUNK_ROWS, chunk_bytes // (4 * max(vocab, 1)))))


if triton is not None:

    @triton.jit
    def _capped(z, scale, softcap, SOFTCAP: tl.constexpr):
        """(T(z), T'(z)/scale-free factor): y = s·z, or c·tanh(s·z/c) with tanh via the sigmoid."""
        y = z * scale
        if SOFTCAP:
            th = 2.0 * tl.sigmoid(2.0 * y / softcap) - 1.0
            return th * softcap, 1.0 - th * th
        return y, tl.full(z.shape, 1.0, tl.float32)

    @triton.jit
    def _head_rows_kernel(
        z_ptr, y_ptr, w_ptr, nll_ptr, V, stride_zn, stride_zv, scale, softcap,
        SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """Row r of a chunk: ℓ_r = lse(T(z_r)) − T(z_r)[y_r]; with WRITE_GRAD, z_r ← w_r (softmax − onehot)·T'(z_r).

        z (n, V) fp32, any strides (written in place); y (n,) int; w (n,) fp32; nll (n,) fp32.
        Grid: (n,). Pass 1 streams the row once with an online max / sum of exponentials per lane (fp32);
        pass 2 (WRITE_GRAD) streams it again and writes g over z.
        FLOPs ≈ 10·V per row (plus a tanh per element with a soft-cap); bytes ≈ 4·V (pass 1) + 8·V (pass 2)
        per row: bandwidth-bound, next to the 2·d·V FLOPs per row of the head GEMM that made z.
        """
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride_zn
        target = tl.load(y_ptr + row).to(tl.int64)
        m_vec = tl.full([BLOCK_V], -1.0e30, tl.float32)
        s_vec = tl.zeros([BLOCK_V], tl.float32)
        y_t = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            mask = offs < V
            z = tl.load(base + offs * stride_zv, mask=mask, other=0.0).to(tl.float32)
            y, _slope = _capped(z, scale, softcap, SOFTCAP)
            y = tl.where(mask, y, -1.0e30)
            m_new = tl.maximum(m_vec, y)
            s_vec = s_vec * tl.exp(m_vec - m_new) + tl.where(mask, tl.exp(y - m_new), 0.0)
            m_vec = m_new
            y_t += tl.where(offs == target, y, 0.0)
        m = tl.max(m_vec, axis=0)
        lse = m + tl.log(tl.sum(s_vec * tl.exp(m_vec - m), axis=0))
        tl.store(nll_ptr + row, lse - tl.sum(y_t, axis=0))
        if WRITE_GRAD:
            w = tl.load(w_ptr + row).to(tl.float32)
            for v0 in range(0, V, BLOCK_V):
                offs = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
                mask = offs < V
                z = tl.load(base + offs * stride_zv, mask=mask, other=0.0).to(tl.float32)
                y, slope = _capped(z, scale, softcap, SOFTCAP)
                g = tl.exp(y - lse) - tl.where(offs == target, 1.0, 0.0)
                tl.store(base + offs * stride_zv, g * slope * (scale * w), mask=mask)


def head_rows(z: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor], scale: float = 1.0,
              softcap: Optional[float] = None, *, with_grad: bool = True):
    """(ℓ (n,), g (n, V) or None) of one chunk of head outputs z (n, V); g may share z's storage (z is consumed).

    z: fp32 (Triton or reference) or fp64 (reference); targets (n,) int64 in [0, V); weights (n,) or None (1).
    ℓ and g in z's dtype. See the module docstring for the formula.
    """
    if z.dim() != 2 or targets.shape != (z.shape[0],):
        raise ValueError(f"z must be (n, V) and targets (n,), got {tuple(z.shape)} and {tuple(targets.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive float or None, got {softcap!r}")
    n, V = z.shape
    if weights is None:
        weights = torch.ones(n, dtype=z.dtype, device=z.device)
    if z.dtype != torch.float32 or backend_for(z) == "reference" or n == 0:
        nll, g = head_rows_reference(z, targets, weights, scale, softcap, with_grad=with_grad)
        return nll, g
    nll = torch.full((n,), float("nan"), dtype=torch.float32, device=z.device)
    block = INTERPRETER_BLOCK_V if z.device.type != "cuda" else BLOCK_V
    _head_rows_kernel[(n,)](
        z, targets, weights.to(torch.float32).contiguous(), nll, V, z.stride(0), z.stride(1),
        float(scale), float(softcap or 1.0),
        SOFTCAP=softcap is not None, WRITE_GRAD=with_grad, BLOCK_V=block,
    )
    count_launch("head_rows")
    return nll, (z if with_grad else None)


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _logits(a_c, weight, bias) -> torch.Tensor:
    """z = a Wᵀ + b in the head's own dtype (as the model computes it), then fp32 (fp64 stays fp64)."""
    z = F.linear(a_c, weight, bias)
    return z.to(_acc(z))


def head_chunks(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                weights: Optional[torch.Tensor] = None, scale: float = 1.0, softcap: Optional[float] = None,
                chunk_rows: Optional[int] = None) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Yield (rows, ℓ (c,), g (c, V)) per chunk of rows of `a (n, d)`; W (V, d); nothing (n × V) is kept."""
    n, V = a.shape[0], weight.shape[0]
    step = chunk_rows or chunk_rows_for(n, V)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        w_c = None if weights is None else weights[rows]
        nll, g = head_rows(_logits(a[rows], weight, bias), targets[rows], w_c, scale, softcap)
        yield rows, nll, g


def head_nll(a, weight, bias, targets, scale: float = 1.0, softcap: Optional[float] = None,
             chunk_rows: Optional[int] = None) -> torch.Tensor:
    """ℓ (n,) alone, chunk by chunk (fp32; fp64 for fp64 inputs)."""
    n, V = a.shape[0], weight.shape[0]
    step = chunk_rows or chunk_rows_for(n, V)
    out = torch.empty(n, dtype=_acc(a), device=a.device)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        out[rows] = head_rows(_logits(a[rows], weight, bias), targets[rows], None, scale, softcap, with_grad=False)[0]
    return out


def head_grads(a, weight, bias, targets, coef: torch.Tensor, scale: float = 1.0, softcap: Optional[float] = None,
               chunk_rows: Optional[int] = None, need_a: bool = True, need_w: bool = True, need_b: bool = True):
    """∂(Σ_t c_t ℓ_t)/∂(a, W, b) with c = coef (n,), recomputing each chunk: (grad_a (n, d) | None,
    grad_W (V, d) | None, grad_b (V,) | None), in the dtypes of a, W and b. FLOPs ≈ 6·n·d·V (z, gW, gᵀa)."""
    V = weight.shape[0]
    acc = _acc(a)
    grad_a = torch.empty_like(a) if need_a else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(V, dtype=acc, device=weight.device) if (need_b and bias is not None) else None
    for rows, _nll, g in head_chunks(a, weight, bias, targets, coef.to(acc), scale, softcap, chunk_rows):
        if need_a:
            grad_a[rows] = (g.to(weight.dtype) @ weight).to(a.dtype)
        if need_w:
            grad_w.addmm_(g.t(), a[rows].to(acc))
        if grad_b is not None:
            grad_b += g.sum(0)
    return (grad_a,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))
