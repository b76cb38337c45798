"""The θ₀ snapshot that stability's drift term Δ_l = W_l − W_l⁰ is measured against."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layers import TrackedLayer


class Anchor:
    """Reference weights of the tracked layers, in their storage shape, on `device` in `dtype` if given.

    reference: None (snapshot the current weights now), a state dict keyed like `model.state_dict()`, or a
    module with the same structure.

    Whether a weight has moved is decided from its values, every call: Δ is computed and the drift term is
    skipped only when Δ is exactly zero. (A version counter or a storage pointer cannot decide it: a write
    through `.data`, an EMA update, `load_state_dict` into the same storage or a flat-buffer optimizer moves
    the values without changing either.)
    """

    def __init__(self, layers: list[TrackedLayer], reference=None, device=None, dtype: Optional[torch.dtype] = None):
        self.weights: dict[str, torch.Tensor] = {}
        state = reference.state_dict() if isinstance(reference, nn.Module) else reference
        for layer in layers:
            w = layer.weight
            if state is None:
                ref = w.detach()
            else:
                key = f"{layer.name}.weight"
                if key not in state:
                    raise ValueError(f"reference has no weight {key!r} for tracked layer {layer.name!r}")
                ref = state[key]
                if tuple(ref.shape) != tuple(w.shape):
                    raise ValueError(f"reference {key!r} has shape {tuple(ref.shape)}, the model {tuple(w.shape)}")
            self.weights[layer.name] = ref.to(device=device or w.device, dtype=dtype or w.dtype, copy=True)

    def delta(self, layer: TrackedLayer) -> Optional[torch.Tensor]:
        """Δ = W − W⁰ in the weight's storage shape, float32 (float64 for float64 weights); None when every
        entry is exactly zero (the weights have not moved), so that the drift term can be skipped."""
        w = layer.weight.detach()
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        delta = w.to(dtype) - self.weights[layer.name].to(device=w.device, dtype=dtype)
        return delta if bool(delta.any()) else None

    def moved(self, layer: TrackedLayer) -> bool:
        """Whether the layer's weight differs from θ₀ in any entry (by value)."""
        return self.delta(layer) is not None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())
