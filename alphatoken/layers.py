"""Which modules are valued, and the model-specific facts about them (the one place that knows them).

Tracked layers (DESIGN §2): every trainable `nn.Linear` and transformers `Conv1D` (weight stored transposed),
optionally the input `nn.Embedding`, plus the head from `get_output_embeddings()` (always, even when frozen).
Every layer is seen as `z = W a` with `W` of shape (d_out, d_in): `weight` for Linear, `weight.T` for Conv1D,
`weight.T` (d, vocab) for an Embedding whose input `a` is the one-hot of the token.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a hard dependency, but keep the import soft
    Conv1D = ()


@dataclass
class TrackedLayer:
    name: str
    module: nn.Module
    kind: str  # "linear" | "conv1d" | "embedding"
    is_head: bool = False

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    def weight_matrix(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight (or a tensor of the weight's storage shape) as (d_out, d_in)."""
        w = self.module.weight if weight is None else weight
        return w if self.kind == "linear" else w.t()

    @property
    def shape(self) -> tuple[int, int]:
        d_out, d_in = self.weight_matrix().shape
        return d_out, d_in

    def output_gradient(self, grad: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """g = ∂L/∂(W a) from the gradient of the module's output, so that Σ_s g_s a_sᵀ = ∇_W L exactly.

        The identity for Linear / Conv1D. For an Embedding: times `embed_scale` for a scaled embedding (its
        output is `scale · W[:, x]`, e.g. Gemma), and 0 at `padding_idx` (F.embedding never updates that column).
        """
        if self.kind != "embedding":
            return grad
        scale = _embedding_scale(self.module)
        if scale is not None:
            grad = grad * scale
        pad = self.module.padding_idx
        if pad is not None:
            grad = grad.masked_fill((inputs == pad).unsqueeze(-1), 0.0)
        return grad


def _kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def _plain_lookup(module: nn.Module) -> bool:
    """Whether the embedding's forward is nn.Embedding's own (a bare lookup)."""
    return type(module).forward is nn.Embedding.forward


def _embedding_scale(module: nn.Module):
    """The output scale of a scaled word embedding (`forward = lookup · embed_scale`); None for nn.Embedding."""
    if _plain_lookup(module):
        return None
    scale = module.embed_scale
    return scale.to(module.weight.dtype) if isinstance(scale, torch.Tensor) else scale


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or _kind(head) not in ("linear", "conv1d"):
        raise ValueError(
            f"AlphaToken needs a causal LM with a linear output head: {type(model).__name__}."
            f"get_output_embeddings() returned {type(head).__name__ if head is not None else None}. "
            "Use a *ForCausalLM model (or one whose get_output_embeddings() is an nn.Linear)."
        )
    for name, module in model.named_modules():
        if module is head:
            return name, head
    raise ValueError("the output head returned by get_output_embeddings() is not a submodule of the model")


def find_blocks(model: nn.Module) -> tuple[str, int]:
    """The transformer blocks: the longest nn.ModuleList of same-class modules that is not inside another one
    (lists within a block — per-head norms, experts — are not the blocks). Returns (prefix, count)."""
    best, best_len, lists = None, 0, []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len({type(m) for m in module}) == 1:
            if any(name.startswith(outer + ".") for outer in lists):
                continue
            lists.append(name)
            if len(module) > best_len:
                best, best_len = name, len(module)
    if best is None:
        raise ValueError(
            "tracked_layers=<int> selects the last k transformer blocks, but no nn.ModuleList of blocks was found "
            "in this model; use 'all' or a regex on module names instead"
        )
    return best, best_len


def _check_supported(name: str, module: nn.Module, kind: str) -> None:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(
            f"unsupported tracked module {name!r} ({type(module).__name__}): its weight is "
            f"{None if w is None else (tuple(w.shape), w.dtype)}, AlphaToken needs a 2-D floating-point weight. "
            "Exclude it with AlphaTokenConfig(tracked_layers=<regex>)."
        )


def discover_layers(
    model: nn.Module, tracked: Union[str, int] = "all", track_embeddings: bool = False
) -> list[TrackedLayer]:
    """The head first, then the body layers in module order."""
    head_name, head = find_head(model)
    layers = [TrackedLayer(head_name, head, _kind(head), is_head=True)]
    _check_supported(head_name, head, layers[0].kind)

    keep = _name_filter(model, tracked)
    embedding = model.get_input_embeddings() if track_embeddings else None
    if track_embeddings and not isinstance(embedding, nn.Embedding):
        raise ValueError(f"track_embeddings=True needs an nn.Embedding input layer, got {type(embedding).__name__}")
    if track_embeddings and not _plain_lookup(embedding) and not hasattr(embedding, "embed_scale"):
        raise ValueError(
            f"unsupported tracked module: the input embedding {type(embedding).__name__} transforms its lookup in "
            "its own forward (a plain or an `embed_scale`-scaled lookup is supported); use track_embeddings=False"
        )
    for name, module in model.named_modules():
        if module is head:
            continue
        kind = _kind(module)
        if kind is None:
            continue
        if kind == "embedding":
            if module is embedding:
                layers.append(TrackedLayer(name, module, kind))
            continue
        if not module.weight.requires_grad or not keep(name):
            continue
        _check_supported(name, module, kind)
        layers.append(TrackedLayer(name, module, kind))
    return layers


def _name_filter(model: nn.Module, tracked: Union[str, int]):
    if tracked == "all":
        return lambda name: True
    if isinstance(tracked, int):
        prefix, count = find_blocks(model)
        first = max(count - tracked, 0)
        pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")

        def in_last_blocks(name: str) -> bool:
            m = pattern.match(name)
            return m is not None and int(m.group(1)) >= first

        return in_last_blocks
    try:
        regex = re.compile(tracked)
    except re.error as err:
        raise ValueError(f"tracked_layers={tracked!r} is not 'all', an int or a valid regex: {err}") from err
    return lambda name: regex.search(name) is not None


def unvalued_weights(model: nn.Module) -> list[str]:
    """Trainable matrices (≥ 2-D) held by modules that no tracking covers: not Linear / Conv1D / Embedding.

    E.g. fused mixture-of-experts weights (3-D `experts.gate_up_proj`) or a router that is not an nn.Linear.
    The values are not defined over them; layers left out on purpose (`tracked_layers`) are not listed.
    """
    names = []
    for module_name, module in model.named_modules():
        if _kind(module) is not None:
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param.requires_grad and param.dim() >= 2:
                names.append(f"{module_name}.{param_name}" if module_name else param_name)
    return names
