"""The θ₀ snapshot that stability's drift term Δ_l = W_l − W_l⁰ is measured against."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layers import TrackedLayer


class Anchor:
    """Reference weights of the tracked layers, in their storage shape, on `device` in `dtype` if given.

    reference: None (snapshot the current weights now), a state dict keyed like `model.state_dict()`, or a
    module with the same structure. A snapshot taken here also remembers each weight's version counter, so
    while the weights have not moved Δ is known to be 0 and the drift term is skipped.
    """

    def __init__(self, layers: list[TrackedLayer], reference=None, device=None, dtype: Optional[torch.dtype] = None):
        self.weights: dict[str, torch.Tensor] = {}
        self.versions: dict[str, tuple[int, int]] = {}
        state = reference.state_dict() if isinstance(reference, nn.Module) else reference
        for layer in layers:
            w = layer.weight
            if state is None:
                ref = w.detach()
                self.versions[layer.name] = (w._version, w.data_ptr())
            else:
                key = f"{layer.name}.weight"
                if key not in state:
                    raise ValueError(f"reference has no weight {key!r} for tracked layer {layer.name!r}")
                ref = state[key]
                if tuple(ref.shape) != tuple(w.shape):
                    raise ValueError(f"reference {key!r} has shape {tuple(ref.shape)}, the model {tuple(w.shape)}")
            self.weights[layer.name] = ref.to(device=device or w.device, dtype=dtype or w.dtype, copy=True)

    def moved(self, layer: TrackedLayer) -> bool:
        seen = self.versions.get(layer.name)
        w = layer.weight
        return seen is None or seen != (w._version, w.data_ptr())

    def delta(self, layer: TrackedLayer) -> Optional[torch.Tensor]:
        """Δ in the weight's storage shape, float32 (float64 for float64 weights); None when provably zero."""
        if not self.moved(layer):
            return None
        w = layer.weight.detach()
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        return w.to(dtype) - self.weights[layer.name].to(device=w.device, dtype=dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())
