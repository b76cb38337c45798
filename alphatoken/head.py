"""The output head's part of a step (DESIGN §3 direct path), chunk by chunk over the response rows.

At the rows a_t (d,) that predict response tokens, with g_t = w_t (softmax − onehot(y_t)) ⊙ T'(z_t) (V,):
    seed_t       = g_t W                                  the valuation backward starts here (no logit gradient)
    adaptation_t = η s · g_tᵀ U a_t                       U: the batch's (1/n) Σ_s g_s a_sᵀ, or a validation U
    stability_t  = η gᵀ(F ⊙ Δ)a − ½ η² (g⊙g)ᵀ F (a⊙a)     ("diag"; "kfac" with F = f_out f_inᵀ)
Every contraction runs on the vocabulary side first (g_c M: (rows, d)), so no (rows × V) temporary beyond
the chunk's own g. With the batch target, U is accumulated over the chunks and a second pass forms g_tᵀ U a_t.

`HeadTransform` is the model's map from the head output to its logits (soft-capping, logit scaling); it is
read from the config and checked against the model's own logits before the fused head is trusted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from alphatoken import kernels as K

from .credits import Direction


@dataclass(frozen=True)
class HeadTransform:
    """logits = T(z): z · multiply / divide, then c·tanh(·/c) with a soft-cap c (Gemma-2); identity by default."""

    multiply: Optional[float] = None  # Cohere's logit_scale
    divide: Optional[float] = None  # Granite's logits_scaling
    softcap: Optional[float] = None  # final_logit_softcapping

    @property
    def scale(self) -> float:
        return (self.multiply or 1.0) / (self.divide or 1.0)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """The same operations, in the same order, as the models that use them."""
        if self.multiply is not None:
            z = z * self.multiply
        if self.divide is not None:
            z = z / self.divide
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def candidate_transform(model) -> HeadTransform:
    """The post-head map the model's config describes (checked by `matches` before it is used)."""
    cfg = getattr(model, "config", None)
    return HeadTransform(
        multiply=_number(getattr(cfg, "logit_scale", None)),
        divide=_number(getattr(cfg, "logits_scaling", None)),
        softcap=_number(getattr(cfg, "final_logit_softcapping", None)),
    )


CHECK_ROWS = 4  # rows of the head's output checked against W a + b and the transform


def matches(transform: HeadTransform, head_output: torch.Tensor, logits: torch.Tensor,
            linear: Optional[torch.Tensor] = None) -> bool:
    """Whether the head's output is `linear` (W a + b recomputed from its input for its first rows: no hook or
    custom forward changed it) and the model's logits are `transform(head_output)` (to a few ulps) in a dtype at
    least as precise, on the first CHECK_ROWS rows."""
    if not isinstance(head_output, torch.Tensor) or not isinstance(logits, torch.Tensor):
        return False
    if head_output.numel() != logits.numel() or torch.finfo(logits.dtype).eps > torch.finfo(head_output.dtype).eps:
        return False
    out = head_output.detach().reshape(-1, head_output.shape[-1])[:CHECK_ROWS]
    if linear is not None:
        lin = linear[:CHECK_ROWS]
        tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(out.dtype, 2e-2)
        if lin.shape != out.shape or not torch.allclose(lin.to(out.dtype), out, rtol=tol, atol=tol):
            return False
    if head_output is logits:
        return transform == HeadTransform()
    want = transform(out).to(logits.dtype)
    got = logits.detach().reshape(-1, logits.shape[-1])[:CHECK_ROWS]
    eps = torch.finfo(logits.dtype).eps
    return bool(torch.allclose(want, got, rtol=8 * eps, atol=8 * eps))


@dataclass
class HeadValues:
    """Per response row: nll (n,), adaptation and stability (n,) of the head credit, seed rows g W (n, d), and
    the credit's squared Frobenius norm |g|²|a|² (n,) (alphatoken.combine's cosine and leave-one-out rules)."""

    nll: Optional[torch.Tensor]
    adaptation: torch.Tensor
    stability: torch.Tensor
    seed: Optional[torch.Tensor]
    square_norm: Optional[torch.Tensor] = None


Chunks = Callable[[], Iterable[tuple[slice, Optional[torch.Tensor], torch.Tensor]]]


def fused_chunks(a, weight, bias, targets, weights, transform: HeadTransform, chunk_rows=None) -> Chunks:
    """Chunks recomputed from the head's input rows: (rows, ℓ, g) per chunk, through `kernels.head_chunks`."""
    def chunks():
        return K.head_chunks(a, weight, bias, targets, weights, transform.scale, transform.softcap, chunk_rows)
    return chunks


def materialized_chunks(g: torch.Tensor, chunk_rows=None) -> Chunks:
    """Chunks sliced from output-gradient rows the caller already holds (n, V) (the fallback path)."""
    step = chunk_rows or K.chunk_rows_for(g.shape[0], g.shape[1])

    def chunks():
        return ((slice(s, min(s + step, g.shape[0])), None, g[s:s + step]) for s in range(0, g.shape[0], step))
    return chunks


DRIFT_BLOCK_ELEMENTS = 1 << 22  # vocabulary rows per block of the tile-wise drift: ~16 MiB of fp32


def _drift_rows(g: torch.Tensor, ref: tuple, F: Optional[torch.Tensor], acc: torch.dtype) -> torch.Tensor:
    """g (F ⊙ (W − W₀)) as (rows, d), over blocks of vocabulary rows: Δ and F ⊙ Δ exist one block at a time."""
    W, W0 = ref
    V, d = W.shape
    out = torch.zeros(g.shape[0], d, dtype=acc, device=g.device)
    step = max(1, DRIFT_BLOCK_ELEMENTS // max(d, 1))
    for v0 in range(0, V, step):
        block = W[v0:v0 + step].to(acc) - W0[v0:v0 + step].to(acc)
        if F is not None:
            block.mul_(F[v0:v0 + step])
        out.addmm_(g[:, v0:v0 + step], block)
    return out


def head_values(a: torch.Tensor, weight: torch.Tensor, chunks: Chunks, eta: float, *,
                direction: Optional[Direction] = None, batch_scale: Optional[float] = None,
                reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                fisher=None, delta: Optional[torch.Tensor] = None, reference: Optional[tuple] = None,
                want_seed: bool = True, precondition: Optional[tuple] = None) -> HeadValues:
    """Values of the head credits g_t a_tᵀ and the seed rows g_t W, one chunk of g at a time.

    a (n, d) head-input rows; weight (V, d). `batch_scale` set: the batch target U = batch_scale · Σ gᵀa,
    accumulated here (`reduce` sums it across ranks), then a second pass over the chunks. Otherwise
    `direction` (a validation U: matrix or factors) or None. fisher: None, ("diag", F), ("kfac", f_out, f_in);
    delta: W − W₀ as (V, d) or None; or `reference` = (W, W₀), both (V, d) on a's device: the drift is then
    formed tile by tile (`_drift_rows`), with no weight-sized Δ or F ⊙ Δ. Accumulation in fp32 (fp64 for fp64).
    precondition: (p_out (V,), p_in (d,)): adaptation ⟨P ⊙ C, U⟩ and the credit norm ⟨C, P ⊙ C⟩ in the metric
    P = p_out p_inᵀ (AlphaTokenConfig.precondition); U itself stays the plain gradient.
    """
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    n, d = a.shape
    adaptation = torch.zeros(n, dtype=acc, device=a.device)
    stability = torch.zeros(n, dtype=acc, device=a.device)
    square_norm = torch.zeros(n, dtype=acc, device=a.device)
    nll = None
    seed = torch.empty(n, d, dtype=weight.dtype, device=a.device) if want_seed else None
    U = torch.zeros(weight.shape, dtype=acc, device=a.device) if batch_scale is not None else None
    kind = fisher[0] if fisher is not None else None
    F = f_out = f_in = drift = None
    tiled = reference is not None and kind is not None
    if kind == "diag":
        F = fisher[1].to(acc)
        drift = F * delta.to(acc) if delta is not None and not tiled else None  # one (V, d) product per step
    elif kind == "kfac":
        f_out, f_in = fisher[1].to(acc), fisher[2].to(acc)
        drift = delta.to(acc) if delta is not None and not tiled else None
    ref = None
    if U is None and direction is not None:
        ref = (direction.matrix.to(acc),) if direction.matrix is not None else \
            (direction.a_ref.to(acc), direction.g_ref.to(acc))

    p_out, p_in = (None, None) if precondition is None else (precondition[0].to(acc), precondition[1].to(acc))

    def scaled(g, a_c):  # the token side of ⟨P ⊙ C, U⟩
        return (g, a_c) if p_out is None else (g * p_out, a_c * p_in)

    for rows, nll_c, g in chunks():
        if nll_c is not None:
            if nll is None:
                nll = torch.empty(n, dtype=nll_c.dtype, device=a.device)
            nll[rows] = nll_c
        a_c = a[rows].to(acc)
        g = g.to(acc)
        if p_out is None:
            square_norm[rows] = (g * g).sum(1) * (a_c * a_c).sum(1)
        else:
            square_norm[rows] = ((g * g) @ p_out) * ((a_c * a_c) @ p_in)
        if seed is not None:
            seed[rows] = g.to(weight.dtype) @ weight
        if U is not None:
            U.addmm_(g.t(), a_c)
        elif ref is not None:
            g_u, a_u = scaled(g, a_c)
            form = ((g_u @ ref[0]) * a_u).sum(1) if len(ref) == 1 else ((g_u @ ref[1].t()) * (a_u @ ref[0].t())).sum(1)
            adaptation[rows] = (eta * direction.scale) * form
        if kind == "diag":
            norm = ((g * g) @ F * (a_c * a_c)).sum(1)
            stab = -0.5 * eta * eta * norm
            if drift is not None:
                stab = stab + eta * ((g @ drift) * a_c).sum(1)
            elif tiled:
                stab = stab + eta * (_drift_rows(g, reference, F, acc) * a_c).sum(1)
            stability[rows] = stab
        elif kind == "kfac":
            norm = ((g * g) @ f_out) * ((a_c * a_c) @ f_in)
            stab = -0.5 * eta * eta * norm
            if drift is not None:
                stab = stab + eta * (((g * f_out) @ drift) * (a_c * f_in)).sum(1)
            elif tiled:
                stab = stab + eta * (_drift_rows(g * f_out, reference, None, acc) * (a_c * f_in)).sum(1)
            stability[rows] = stab
        del g

    if U is not None:
        if reduce is not None:
            U = reduce(U)
        for rows, _nll, g in chunks():  # second pass: g_tᵀ U a_t with the whole batch's U
            g_u, a_u = scaled(g.to(acc), a[rows].to(acc))
            adaptation[rows] = (eta * batch_scale) * ((g_u @ U) * a_u).sum(1)
    return HeadValues(nll, adaptation, stability, seed, square_norm)
