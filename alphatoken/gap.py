"""The tuned copy's exact loss gap (DESIGN §3.10), beside the tuned target's first-order value.

With the tuned target, a token's direct adaptation is the first-order change of its loss along U = θ − θ_val:

    A_t = η⟨∇ℓ_t, U⟩ ≈ η [ℓ_t(θ) − ℓ_t(θ − U)],      the gap   G_t = ℓ_t(θ) − ℓ_t(θ − U)

where θ − U holds every tracked layer's tuned weight (the copy's, as `TunedDirections` forms U from). The slope
at θ misses what saturates on the way: a filler opening ("Sure") whose probability the copy drives to ~0 has a gap
of 10–20 nats while its slope ranks it near the keep boundary, so a share of them is kept and the model learns to
open general answers with it (benchmarks/quality/RESULTS.md, round 9). The gap sees it. It enters the ranking as
a veto, `adaptation = min(rank(A), rank(G) + m)` (m = `loss_gap_margin`, alphatoken/combine.py): a token keeps its
first-order rank unless the exact gap ranks it more than m lower.

Cost: one forward of the model with the tuned weights swapped in (no gradient, no tangent); with the fused head
trusted the forward stops at the head input and the head runs on the response rows in chunks, as in own.py.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from alphatoken import kernels as K

from .batch import model_inputs
from .layers import TrackedLayer
from .own import head_input, module_weights


def check_loss_gap(cfg) -> None:
    """Refuse a loss gap the config cannot use (after target="auto" and loss_gap_margin=None resolved)."""
    if cfg.loss_gap_margin >= 1:
        return
    if cfg.target != "tuned":
        raise ValueError(f"loss_gap_margin={cfg.loss_gap_margin} needs the tuned copy of target=\"tuned\" (this "
                         f"config has target={cfg.target!r}); set loss_gap_margin=1.0 to switch the loss gap off")
    if cfg.combine != "rank":
        raise ValueError(f"loss_gap_margin={cfg.loss_gap_margin} compares ranks: it needs combine=\"rank\" (the gap "
                         "is in nats, the first-order value in the cosine rule's units); set loss_gap_margin=1.0 "
                         "with combine=\"linear\"")


def tuned_nll(model: nn.Module, layers: list[TrackedLayer], tuned_weight: Callable[[TrackedLayer], torch.Tensor],
              batch: dict, head_rows: torch.Tensor, targets: torch.Tensor, transform=None,
              chunk_rows: Optional[int] = None) -> torch.Tensor:
    """(n,) ℓ_t(θ − U) of the response tokens predicted at the flattened rows `head_rows`, whose labels are
    `targets`: `model` run with every tracked layer's weight replaced by `tuned_weight(layer)` (its storage shape),
    the rest as they are; float32 (float64 for a float64 model). transform: as in `own.own_adaptation` (the head on
    the response rows only, `chunk_rows` at a time, no (B·T, V) logits)."""
    from torch.func import functional_call

    out_dtype = torch.float64 if layers[0].weight.dtype == torch.float64 else torch.float32
    names = {id(p): name for name, p in model.named_parameters()}
    by_parameter: dict[str, torch.Tensor] = {}
    for layer in layers:
        name = names.get(id(layer.weight))
        if name is None:
            raise ValueError(f"the loss gap: the weight of tracked layer {layer.name!r} is not a parameter of the model")
        by_parameter.setdefault(name, tuned_weight(layer).to(device=layer.weight.device, dtype=layer.weight.dtype))
    weights = {path: w for path, (_, w) in module_weights(model, by_parameter).items()}
    inputs = model_inputs(model, batch)
    head = layers[0]

    def nll(logits: torch.Tensor, rows_targets: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits.to(out_dtype), dim=-1)
        return -logp.gather(1, rows_targets.unsqueeze(1)).squeeze(1)

    with torch.no_grad():
        if transform is None:
            logits = functional_call(model, weights, (), inputs, tie_weights=False).logits
            return nll(logits.reshape(-1, logits.shape[-1]).index_select(0, head_rows), targets)
        x = head_input(model, head, weights, inputs)
        weight = head.weight_matrix(weights.get(f"{head.name}.weight", head.weight.detach()))
        bias = getattr(head.module, "bias", None)
        bias = None if bias is None else bias.detach()
        size = chunk_rows or K.chunk_rows_for(head_rows.numel(), weight.shape[0])
        parts = [torch.zeros(0, dtype=out_dtype, device=head_rows.device)]
        for start in range(0, head_rows.numel(), size):
            rows = head_rows[start:start + size]
            logits = transform(nn.functional.linear(x.index_select(0, rows), weight, bias))
            parts.append(nll(logits, targets[start:start + size]))
        return torch.cat(parts)
