"""The θ₀ snapshot that stability's drift term Δ_l = W_l − W_l⁰ is measured against."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .layers import TrackedLayer
from .sharding import full, is_sharded, local_nbytes, store_like


class Anchor:
    """Reference weights of the tracked layers, in their storage shape, on `device` in `dtype` if given.

    reference: None (snapshot the current weights now), a state dict keyed like `model.state_dict()` (full tensors,
    or DTensors as `Anchor.state_dict()` / a sharded checkpoint holds them), or a module with the same structure.

    Stored like the weight (`sharding.store_like`): under FSDP2 each rank keeps only its shard of θ₀, with the
    weight's placements, so θ₀ costs `1/world` of the weights per rank (DESIGN §16); `reference(layer)` gathers
    the whole of it when a drift term needs it.

    Whether a weight has moved is decided from its values, every call: Δ is computed and the drift term is
    skipped only when Δ is exactly zero. (A version counter or a storage pointer cannot decide it: a write
    through `.data`, an EMA update, `load_state_dict` into the same storage or a flat-buffer optimizer moves
    the values without changing either.)
    """

    def __init__(self, layers: list[TrackedLayer], reference=None, device=None, dtype: Optional[torch.dtype] = None):
        self.weights: dict[str, torch.Tensor] = {}
        # FSDP2's sharded parameters (the optimizer's copies, in their own dtype), kept to form Δ from: inside the
        # unit's window the module holds the unsharded weight, which mixed precision casts (bf16(W) − θ₀ ≠ 0)
        self.sharded: dict[str, torch.Tensor] = {}
        state = reference.state_dict() if isinstance(reference, nn.Module) else reference
        for layer in layers:
            w = layer.weight
            if is_sharded(w):
                self.sharded[layer.name] = w
            if state is None:
                ref = w.detach()
            else:
                key = f"{layer.name}.weight"
                if key not in state:
                    raise ValueError(f"reference has no weight {key!r} for tracked layer {layer.name!r}")
                ref = state[key]
                if tuple(ref.shape) != tuple(w.shape):
                    raise ValueError(f"reference {key!r} has shape {tuple(ref.shape)}, the model {tuple(w.shape)}")
            self.weights[layer.name] = store_like(w, ref, device=device, dtype=dtype or w.dtype)

    def reference(self, layer: TrackedLayer) -> torch.Tensor:
        """θ₀ of the layer in the weight's storage shape, whole (gathered over the mesh when stored sharded: every
        rank must call it, in the same order)."""
        return full(self.weights[layer.name])

    def delta(self, layer: TrackedLayer) -> Optional[torch.Tensor]:
        """Δ = W − W⁰ in the weight's storage shape, float32 (float64 for float64 weights), whole; None when every
        entry is exactly zero (the weights have not moved), so that the drift term can be skipped.

        Under FSDP2, Δ is formed shard by shard from the sharded parameter (the full-precision copy the optimizer
        steps, whether or not the module holds its unsharded, possibly down-cast weight just now) and this rank's
        θ₀ shard, then gathered: one all-gather of Δ per call, and every rank decides "moved" on the same whole Δ.
        """
        w0 = self.weights[layer.name]
        w = self.sharded.get(layer.name, layer.weight).detach()
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        if is_sharded(w) and is_sharded(w0):
            from torch.distributed.tensor import DTensor

            local = w.to_local().to(dtype) - w0.to_local().to(device=w.to_local().device, dtype=dtype)
            delta = full(DTensor.from_local(local, w.device_mesh, w.placements, run_check=False, shape=w.shape,
                                            stride=w.stride()))
        else:
            delta = full(w).to(dtype) - full(w0).to(device=w.device, dtype=dtype)
        return delta if bool(delta.any()) else None

    def is_sharded(self, layer: TrackedLayer) -> bool:
        """Whether the layer's θ₀ is stored sharded (FSDP2)."""
        return is_sharded(self.weights[layer.name])

    def moved(self, layer: TrackedLayer) -> bool:
        """Whether the layer's weight differs from θ₀ in any entry (by value)."""
        return self.delta(layer) is not None

    def nbytes(self) -> int:
        """Bytes of θ₀ held by this rank (its shards under FSDP2: the whole θ₀'s bytes / world)."""
        return sum(local_nbytes(t) for t in self.weights.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """θ₀ keyed like the model's state dict (`<layer>.weight`), the stored tensors themselves (DTensors under
        FSDP2): what a checkpoint saves, and a valid `reference=` for a resumed run. `torch.distributed.checkpoint`
        saves and loads it shard by shard (loading in place)."""
        return {f"{name}.weight": t for name, t in self.weights.items()}

    def load_state_dict(self, state: dict) -> None:
        """Copy θ₀ from `state` (keyed as `state_dict()`, full tensors or DTensors) into the stored tensors."""
        missing = [key for key in self.state_dict() if key not in state]
        if missing:
            raise ValueError(f"the θ₀ state has no {missing[:4]}")
        with torch.no_grad():
            for key, mine in self.state_dict().items():
                src = store_like(mine, state[key])
                (mine.to_local() if is_sharded(mine) else mine).copy_(src.to_local() if is_sharded(src) else src)
