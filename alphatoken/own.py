"""The direct path over every tracked layer (DESIGN §3.9): a token's own first-order value by forward mode.

With `direct_layers="all"` the direct adaptation of response token t is

    A_t = η ⟨∇_θ ℓ_t, U⟩ = η · d/dε ℓ_t(θ + εU) |_{ε=0}

over the weights of every tracked layer, not only the head. All tokens' values come from one forward-mode pass
(dual numbers, `torch.autograd.forward_ad`) whose tangent is U: no per-token gradient is built, and no backward is run. U is the target
direction of each tracked layer, in its parameter's layout; a weight held by two tracked layers (a tied head and
embedding) gets the sum of their directions when each is the gradient through one use (validation target), the
displacement once when each is already the whole weight's (tuned target). The head credit's norm still
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

from alphatoken import kernels as K

from .batch import model_inputs
from .credits import Direction, dense_direction
from .layers import TrackedLayer
from .sharding import is_sharded
from .tokens import gather, log_probs


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
        matrix = dense_direction(direction)  # (d_out, d_in); an embedding's is already (vocab, d), its storage
        tangent = (matrix if layer.kind == "embedding" else layer.weight_matrix(matrix)).to(layer.weight.dtype)
        if name not in tangents:
            tangents[name] = tangent
        elif shared == "sum":
            tangents[name] = tangents[name] + tangent
    return tangents


def module_weights(model: nn.Module, by_parameter: dict[str, torch.Tensor]) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """{module path + ".weight": (module, tensor)} for every module whose weight is a parameter named in
    `by_parameter`: each use of a tied weight is its own entry (`functional_call(..., tie_weights=False)`)."""
    names = {id(p): name for name, p in model.named_parameters()}
    out = {}
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        name = names.get(id(weight)) if isinstance(weight, nn.Parameter) else None
        if name in by_parameter:
            out[f"{path}.weight" if path else "weight"] = (module, by_parameter[name])
    return out


def module_tangents(model: nn.Module, tangents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{module path + ".weight": tangent} for every module whose weight has a tangent, so that each use of a tied
    weight gets its own (`functional_call(..., tie_weights=False)`). An nn.Embedding's tangent is 0 at its
    `padding_idx` row, as autograd's gradient is there (the engine's embedding credits follow the same convention):
    a zero padding row (Gemma) would otherwise give its token an unbounded derivative through the next norm."""
    out = {}
    for path, (module, tangent) in module_weights(model, tangents).items():
        pad = getattr(module, "padding_idx", None) if isinstance(module, nn.Embedding) else None
        if pad is not None:
            tangent = tangent.clone()
            tangent[pad] = 0
        out[path] = tangent
    return out


class _HeadReached(Exception):
    """Raised by the head's pre-hook: the forward stops once the head input is known."""


def head_input(model: nn.Module, head: TrackedLayer, weights: dict, inputs: dict) -> torch.Tensor:
    """The head's input rows (B·T, d) of `model` run with `weights` (dual numbers or plain tensors), the head
    itself not run."""
    from torch.func import functional_call

    reached = {}

    def stop(module, args):
        reached["x"] = args[0]
        raise _HeadReached

    handle = head.module.register_forward_pre_hook(stop)
    try:
        functional_call(model, weights, (), inputs, tie_weights=False)
    except _HeadReached:
        pass
    finally:
        handle.remove()
    x = reached["x"]
    return x.reshape(-1, x.shape[-1])


def response_nll(model: nn.Module, head: TrackedLayer, weights: dict, inputs: dict, head_rows: torch.Tensor,
                 targets: torch.Tensor, transform=None, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """(n,) ℓ_t of the response tokens predicted at the flattened rows `head_rows` (labels `targets`), `model` run
    with `weights` ({module path + ".weight": tensor}, dual numbers or plain tensors; `functional_call` with
    `tie_weights=False`), in float32 (float64 for float64 logits). transform: the model's logits as
    `transform(head(x))` (`head.HeadTransform`, trusted by the engine): the forward then stops at the head's input
    and the head runs on the response rows only, `chunk_rows` rows at a time (None: `kernels.chunk_rows_for`), so
    no (B·T, V) logits are formed. Without it the model's own logits are used."""
    from torch.func import functional_call

    if transform is None:
        logits = functional_call(model, weights, (), inputs, tie_weights=False).logits
        return -gather(log_probs(logits.reshape(-1, logits.shape[-1]).index_select(0, head_rows)), targets)
    x = head_input(model, head, weights, inputs)
    weight = head.weight_matrix(weights.get(f"{head.name}.weight", head.weight.detach()))
    bias = getattr(head.module, "bias", None)
    bias = None if bias is None else bias.detach()  # biases are not tracked: no tangent, no tuned value
    size = chunk_rows or K.chunk_rows_for(head_rows.numel(), weight.shape[0])
    parts = []
    for start in range(0, head_rows.numel(), size):
        rows = head_rows[start:start + size]
        logits = transform(nn.functional.linear(x.index_select(0, rows), weight, bias))
        parts.append(-gather(log_probs(logits), targets[start:start + size]))
    return torch.cat(parts)


def own_adaptation(model: nn.Module, layers: list[TrackedLayer], direction_of: Callable[[int], Optional[Direction]],
                   batch: dict, head_rows: torch.Tensor, targets: torch.Tensor, lr: float,
                   shared: str = "sum", transform=None, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """(n,) η⟨∇ℓ_t, U⟩ of the response tokens predicted at the flattened rows `head_rows` (b·T + t − 1), whose
    labels are `targets`, by one forward-mode pass of `model` along U (float32, float64 for a float64 model);
    `shared` as in `parameter_tangents`.

    transform, chunk_rows: as in `response_nll` (with a transform no (B·T, V) logits or tangent is formed). The
    model runs in its current mode, under the math attention kernel (the fused ones have no forward
    mode); gradient checkpointing is fine (dual numbers, not a functorch transform, which refuses its
    requires_grad_ calls).
    """
    import torch.autograd.forward_ad as fwAD
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out_dtype = torch.float64 if layers[0].weight.dtype == torch.float64 else torch.float32
    zeros = torch.zeros(head_rows.numel(), dtype=out_dtype, device=head_rows.device)
    tangents = parameter_tangents(model, layers, direction_of, shared)
    if not tangents or head_rows.numel() == 0:
        return zeros
    inputs = model_inputs(model, batch)
    with sdpa_kernel([SDPBackend.MATH]), torch.no_grad(), fwAD.dual_level():
        duals = {path: fwAD.make_dual(model.get_parameter(path).detach(), tangent)
                 for path, tangent in module_tangents(model, tangents).items()}
        losses = response_nll(model, layers[0], duals, inputs, head_rows, targets, transform, chunk_rows)
        derivative = fwAD.unpack_dual(losses).tangent
    if derivative is None:  # no tracked weight reaches the logits
        return zeros
    return lr * derivative
