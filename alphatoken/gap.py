"""The tuned copy's exact loss gap (DESIGN §3.10), beside the tuned target's first-order value.

With the tuned target, a token's direct adaptation is the first-order change of its loss along U = θ − θ_val:

    A_t = η⟨∇ℓ_t, U⟩ ≈ η [ℓ_t(θ) − ℓ_t(θ − U)],      the gap   G_t = ℓ_t(θ) − ℓ_t(θ − U)

where θ − U holds every tracked layer's tuned weight (the copy's, as `TunedDirections` forms U from). The slope
at θ misses what saturates on the way: a filler opening ("Sure") whose probability the copy drives to ~0 has a gap
of 10–20 nats while its slope ranks it near the keep boundary, so a share of them is kept and the model learns to
open general answers with it (benchmarks/quality/RESULTS.md, round 9). The gap sees it. It enters the ranking
(alphatoken/combine.py) as a veto, `adaptation = min(rank(A), rank(G) + m)` (m = `loss_gap_margin`): a token keeps
its first-order rank unless the exact gap ranks it more than m lower; and as a floor in nats (τ =
`loss_gap_floor`): a token with G_t < −τ (and, with `loss_gap_floor_agree`, a negative first-order value A_t
too) ranks below every token that is not, the most negative gap lowest.

Cost: one forward of the model with the tuned weights swapped in (no gradient, no tangent); with the fused head
trusted the forward stops at the head input and the head runs on the response rows in chunks, as in own.py.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from .batch import model_inputs
from .layers import TrackedLayer
from .own import module_weights, response_nll


def orders_by_copy_loss(cfg) -> bool:
    """Whether the (resolved) config reorders each side of the drop budget by the copy's loss (a positive
    copy_loss_order_weight, §3.12)."""
    return (getattr(cfg, "copy_loss_order_weight", 0.0) or 0.0) > 0


def uses_loss_gap(cfg) -> bool:
    """Whether the (resolved) config reads the tuned copy's forward: a margin below 1, a finite floor, or a
    positive copy_loss_weight (§3.11) or copy_loss_order_weight (§3.12)."""
    return (cfg.loss_gap_margin < 1 or math.isfinite(cfg.loss_gap_floor)
            or (getattr(cfg, "copy_loss_weight", 0.0) or 0.0) > 0 or orders_by_copy_loss(cfg))


def check_loss_gap(cfg) -> None:
    """Refuse a loss gap the config cannot use (after target="auto", loss_gap_margin=None and loss_gap_floor=None
    resolved)."""
    if not uses_loss_gap(cfg):
        return
    setting = (f"loss_gap_margin={cfg.loss_gap_margin}" if cfg.loss_gap_margin < 1
               else f"loss_gap_floor={cfg.loss_gap_floor}" if math.isfinite(cfg.loss_gap_floor)
               else f"copy_loss_weight={cfg.copy_loss_weight}" if (cfg.copy_loss_weight or 0.0) > 0
               else f"copy_loss_order_weight={cfg.copy_loss_order_weight}")
    off = "loss_gap_margin=1.0, loss_gap_floor=math.inf, copy_loss_weight=0 and copy_loss_order_weight=0"
    if cfg.target != "tuned":
        raise ValueError(f"{setting} needs the tuned copy of target=\"tuned\" (this config has "
                         f"target={cfg.target!r}); set {off} to switch the loss gap off")
    if cfg.combine != "rank":
        raise ValueError(f"{setting} ranks the tokens: it needs combine=\"rank\" (the gap is in nats, the "
                         f"first-order value in the cosine rule's units); set {off} with combine=\"linear\"")
    if orders_by_copy_loss(cfg) and cfg.selection != "batch":
        raise ValueError(f"copy_loss_order_weight={cfg.copy_loss_order_weight} reorders the tokens inside and outside "
                         f"the drop budget of selection=\"batch\" (this config has selection={cfg.selection!r}); "
                         f"set copy_loss_order_weight=0")


def tuned_nll(model: nn.Module, layers: list[TrackedLayer], tuned_weight: Callable[[TrackedLayer], torch.Tensor],
              batch: dict, head_rows: torch.Tensor, targets: torch.Tensor, transform=None,
              chunk_rows: Optional[int] = None) -> torch.Tensor:
    """(n,) ℓ_t(θ − U) of the response tokens predicted at the flattened rows `head_rows`, whose labels are
    `targets`: `model` run with every tracked layer's weight replaced by `tuned_weight(layer)` (its storage shape),
    the rest as they are; float32 (float64 for a float64 model). transform, chunk_rows: as in `own.response_nll`
    (the head on the response rows only, no (B·T, V) logits)."""
    if head_rows.numel() == 0:  # a rank without response tokens under global selection
        return torch.zeros(0, dtype=torch.float64 if layers[0].weight.dtype == torch.float64 else torch.float32,
                           device=head_rows.device)
    names = {id(p): name for name, p in model.named_parameters()}
    by_parameter: dict[str, torch.Tensor] = {}
    for layer in layers:
        name = names.get(id(layer.weight))
        if name is None:
            raise ValueError(f"the loss gap: the weight of tracked layer {layer.name!r} is not a parameter of the model")
        by_parameter.setdefault(name, tuned_weight(layer).to(device=layer.weight.device, dtype=layer.weight.dtype))
    weights = {path: w for path, (_, w) in module_weights(model, by_parameter).items()}
    with torch.no_grad():
        return response_nll(model, layers[0], weights, model_inputs(model, batch), head_rows, targets, transform,
                            chunk_rows)
