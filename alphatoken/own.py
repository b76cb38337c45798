"""The direct path over every tracked layer (DESIGN §3.9): a token's own first-order value by forward mode.

With `direct_layers="all"` the direct adaptation of response token t is

    A_t = η ⟨∇_θ ℓ_t, U⟩ = η · d/dε ℓ_t(θ + εU) |_{ε=0}

over the weights of every tracked layer, not only the head. All tokens' values come from one forward-mode pass
(dual numbers, `torch.autograd.forward_ad`) whose tangent is U: no per-token gradient is built, and no backward is run. U is the target
direction of each tracked layer, in its parameter's layout; a weight held by two tracked layers (a tied head and
embedding) gets the sum of their directions, since a step on it moves both uses. The head credit's norm still
gives the cosine rule its scale (the norm of the whole ∇ℓ_t would need per-token gradients).

Why: the head credit is only the last layer of the token's own gradient. Where the head does not move (a tied head
while the last blocks are fine-tuned), a direction such as the tuned target (θ − θ_val, §3.6) is 0 there and the
head-only direct path carries nothing; the body layers' part of ∇ℓ_t sits at earlier positions, where the causal
path mixes it with later tokens' losses. Forward mode separates them exactly.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .batch import model_inputs
from .sharding import is_sharded
from .credits import Direction, matched
from .layers import TrackedLayer


def check_own_path(cfg, layers: list[TrackedLayer]) -> None:
    """Refuse, where the valuer is built, what direct_layers="all" cannot value (after target="auto" resolved)."""
    if cfg.direct_layers != "all":
        return
    if cfg.target == "batch":
        raise ValueError('direct_layers="all" needs U before the batch is valued: use target="validation" or '
                         '"tuned" (the batch target\'s U is built during the valuation backward)')
    if cfg.precondition:
        raise ValueError('direct_layers="all" measures adaptation in the plain metric: it cannot be combined with '
                         'precondition=True')
    if any(is_sharded(layer.weight) for layer in layers):
        raise ValueError('direct_layers="all" runs a forward-mode pass over whole weights, which is not supported '
                         'with FSDP2-sharded weights; use direct_layers="head"')


def dense_direction(direction: Direction) -> torch.Tensor:
    """scale · U of one layer as a matrix (the factors multiplied out when U is kept as factors)."""
    if direction.matrix is not None:
        return direction.matrix * direction.scale
    a, g = matched(direction.a_ref, direction.g_ref)
    return (g.T @ a) * direction.scale


def parameter_tangents(model: nn.Module, layers: list[TrackedLayer],
                       direction_of: Callable[[int], Optional[Direction]], shared: str = "sum") -> dict[str, torch.Tensor]:
    """{parameter name: U in the parameter's layout}; layers without a direction (None) add nothing.

    shared: what a parameter held by two tracked layers (a tied head and embedding) gets: "sum" of their
    directions (each a gradient through that layer's own use, so the sum is the parameter's gradient) or "once"
    (each layer's direction is already the whole parameter's, e.g. the tuned displacement W − W_val)."""
    names = {id(p): name for name, p in model.named_parameters()}
    tangents: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(layers):
        direction = direction_of(index)
        if direction is None:
            continue
        name = names.get(id(layer.weight))
        if name is None:
            raise ValueError(f'direct_layers="all": the weight of tracked layer {layer.name!r} is not a parameter '
                             "of the model")
        matrix = dense_direction(direction)
        tangent = matrix if layer.kind in ("linear", "embedding") else matrix.t()  # Conv1D stores (d_in, d_out)
        tangent = tangent.to(layer.weight.dtype)
        if name not in tangents:
            tangents[name] = tangent
        elif shared == "sum":
            tangents[name] = tangents[name] + tangent
    return tangents


def own_adaptation(model: nn.Module, layers: list[TrackedLayer], direction_of: Callable[[int], Optional[Direction]],
                   batch: dict, head_rows: torch.Tensor, targets: torch.Tensor, lr: float,
                   shared: str = "sum") -> torch.Tensor:
    """(n,) η⟨∇ℓ_t, U⟩ of the response tokens predicted at the flattened rows `head_rows` (b·T + t − 1), whose
    labels are `targets`, by one forward-mode pass of `model` along U (float32, float64 for a float64 model);
    `shared` as in `parameter_tangents`.

    The model runs in its current mode, under the math attention kernel (the fused ones have no forward mode).
    """
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out_dtype = torch.float64 if layers[0].weight.dtype == torch.float64 else torch.float32
    tangents = parameter_tangents(model, layers, direction_of, shared)
    if not tangents or head_rows.numel() == 0:
        return torch.zeros(head_rows.numel(), dtype=out_dtype, device=head_rows.device)
    params = dict(model.named_parameters())
    inputs = model_inputs(model, batch)
    # dual numbers rather than torch.func.jvp: a functorch transform refuses the requires_grad_ calls that
    # gradient checkpointing makes inside the forward
    with sdpa_kernel([SDPBackend.MATH]), torch.no_grad(), fwAD.dual_level():
        duals = {name: fwAD.make_dual(params[name].detach(), tangent) for name, tangent in tangents.items()}
        logits = functional_call(model, duals, (), inputs).logits
        rows = logits.reshape(-1, logits.shape[-1]).index_select(0, head_rows).to(out_dtype)
        losses = -torch.log_softmax(rows, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
        derivative = fwAD.unpack_dual(losses).tangent
    if derivative is None:  # no tracked weight reaches the logits
        return torch.zeros(head_rows.numel(), dtype=out_dtype, device=head_rows.device)
    return lr * derivative
