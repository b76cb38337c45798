"""State sharded like the weights it belongs to (FSDP2, DESIGN §16).

Under FSDP2 (`torch.distributed.fsdp.fully_shard`) a parameter outside its unit's forward / backward is a DTensor
holding `1/world` of the weight (`placements`, e.g. `(Shard(0),)`, over a `device_mesh`); inside that window the
module holds the plain, unsharded weight. AlphaToken's per-weight state (θ₀ and a diag Fisher, both of the weight's
storage shape) is stored the same way, so that its memory per rank is `1/world` too:

    store_like(param, full)   -> this rank's shard of `full`, as a DTensor with `param`'s mesh and placements
                                 (a plain copy when `param` is a plain tensor); no communication
    full(t)                   -> the whole tensor (one all-gather over the mesh when `t` is a DTensor)
    local_nbytes(t)           -> the bytes this rank holds for `t`
    hold_unsharded(root, m)   -> a context in which the FSDP2 unit holding `m`'s weight is unsharded (plain tensors)
    check_head_for_training, check_sharding -> the layouts the valuer refuses, with the fix in the message
    fully_shard_causal_lm(model, layout) -> FSDP2 units of a Hugging Face decoder-only model, in the layouts the
                                 tests and the FSDP2 memory benchmark run

A single process and DDP see plain tensors everywhere, and every function here is then the identity.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_sharded(t) -> bool:
    """Whether `t` is a DTensor (a weight, or state, sharded over a device mesh)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def _mesh_device(t) -> torch.device:
    mesh = t.device_mesh
    return torch.device(mesh.device_type) if mesh.device_type == "cpu" else \
        torch.device(mesh.device_type, torch.accelerator.current_device_index())


def store_like(param: torch.Tensor, full_tensor: torch.Tensor, device=None, dtype: Optional[torch.dtype] = None):
    """A copy of `full_tensor` (the shape of `param`) stored like `param`, in `dtype`, on `device` if given.

    `param` a DTensor: this rank's shard, cut locally from `full_tensor` by `param`'s placements (every rank holds
    the same `full_tensor`, so no data moves), as a DTensor with `param`'s mesh and placements; `device` moves the
    local shard (e.g. a CPU θ₀ for CUDA weights). A DTensor `full_tensor` with the same placements is copied shard
    by shard. `param` a plain tensor: a plain copy (a DTensor `full_tensor` is gathered first).
    """
    if tuple(full_tensor.shape) != tuple(param.shape):
        raise ValueError(f"store_like: a tensor of shape {tuple(full_tensor.shape)} for a weight of shape "
                         f"{tuple(param.shape)}")
    dtype = dtype or param.dtype
    if not is_sharded(param):
        source = full(full_tensor) if is_sharded(full_tensor) else full_tensor
        return source.detach().to(device=device or param.device, dtype=dtype, copy=True)
    from torch.distributed.tensor import DTensor, distribute_tensor

    mesh, placements = param.device_mesh, tuple(param.placements)
    if is_sharded(full_tensor) and tuple(full_tensor.placements) == placements:
        local = full_tensor.to_local()
    else:
        source = full(full_tensor) if is_sharded(full_tensor) else full_tensor
        source = source.detach().to(device=_mesh_device(param), dtype=dtype)
        local = distribute_tensor(source, mesh, placements, src_data_rank=None).to_local()
    local = local.detach().to(device=device or param.device, dtype=dtype, copy=True)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=param.shape, stride=param.stride())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: `t` itself when plain; a DTensor's shards all-gathered over its mesh (every rank of the
    mesh must call this, in the same order), on the local shard's device."""
    if not is_sharded(t):
        return t
    from torch.distributed.tensor import DTensor

    local = t.to_local()
    comm = _mesh_device(t)
    if local.device != comm:  # a shard kept off the mesh's device (reference_device="cpu" with CUDA weights)
        t = DTensor.from_local(local.to(comm), t.device_mesh, t.placements, run_check=False, shape=t.shape,
                               stride=t.stride())
    return t.full_tensor().to(local.device)


def local_nbytes(t: torch.Tensor) -> int:
    """Bytes of `t` held by this rank: its local shard for a DTensor."""
    local = t.to_local() if is_sharded(t) else t
    return local.numel() * local.element_size()


def fsdp_owner(root: nn.Module, module: nn.Module) -> Optional[nn.Module]:
    """The FSDP2 unit whose parameter group holds `module`'s weight: the innermost `fully_shard`-ed module that
    contains `module` (`module` itself included)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:  # pragma: no cover
        return None
    owner = None
    for sub in root.modules():
        if isinstance(sub, FSDPModule) and any(m is module for m in sub.modules()):
            owner = sub  # modules() is pre-order: a later match is nested inside an earlier one
    return owner


@contextlib.contextmanager
def hold_unsharded(root: nn.Module, module: nn.Module, reshard: bool = True):
    """Within the block, `module`'s weight is the unsharded plain tensor: when FSDP2 has resharded it (its unit
    reshards after forward), its unit is unsharded on entry (an all-gather on every rank) and resharded on exit.
    `reshard=False` leaves it unsharded for a training backward that uses it (FSDP2's post-backward reduces its
    gradient and reshards it). Nothing happens when the weight is already plain (no FSDP2, or inside the unit's
    forward / backward window)."""
    weight = getattr(module, "weight", None)
    owner = fsdp_owner(root, module) if is_sharded(weight) else None
    if owner is None:
        yield
        return
    owner.unshard()
    try:
        yield
    finally:
        if reshard:
            owner.reshard()


def _unit_modules(unit: nn.Module) -> tuple:
    """The modules sharing `unit`'s FSDP2 parameter group (`fully_shard([norm, head])` makes one group of two)."""
    state = unit._get_fsdp_state() if hasattr(unit, "_get_fsdp_state") else None
    return tuple(getattr(state, "_modules", ())) or (unit,)


def check_head_for_training(root: nn.Module, head: nn.Module) -> None:
    """Refuse the one FSDP2 layout the fused masked loss cannot train: the head alone in its own unit.

    The masked loss runs the head's matmul outside the forward (`head_loss.chunked_head_loss`) on the captured
    head input. Supported: the head in the root unit (`fully_shard(model)` last), and the head grouped with the
    final norm (accelerate's FSDP2 layout, `fully_shard([norm, head])`): there FSDP2 hooks the unit's post-backward
    to the norm's input. A head alone in its unit gets that hook on its own input, which the valuation backward
    starts from, and the training backward then reads a freed weight (seen as a crash in torch 2.13)."""
    owner = fsdp_owner(root, head) if is_sharded(getattr(head, "weight", None)) else None
    if owner is None or owner is root:
        return
    modules = _unit_modules(owner)
    if len(modules) == 1 and modules[0] is head:
        raise ValueError(
            "AlphaToken's masked loss cannot train an output head that is alone in its own FSDP2 unit; shard the "
            "head with the root (`fully_shard(model)` after the decoder layers) or with the final norm "
            "(`fully_shard([model.model.norm, model.lm_head])`, accelerate's layout). valuer.value() works with "
            "any layout")


def check_sharding(layers, target: str) -> None:
    """Refuse the weight layouts the valuer cannot value, where the valuer is built (DESIGN §16, §17):

    * DeepSpeed ZeRO-3 (a parameter carrying `ds_id`): its weights are partitioned outside the forward and gathered
      by DeepSpeed's own hooks, and no window exists yet in which θ₀ and a diag Fisher can meet the whole weight;
    * target="tuned" with FSDP2-sharded weights: it tunes a copy of the model, which is not sharded like it.
    """
    for layer in layers:
        if hasattr(layer.weight, "ds_id"):
            raise ValueError(
                f"AlphaToken does not support DeepSpeed ZeRO-3 (the weight of {layer.name!r} is partitioned by "
                "DeepSpeed): the drift term needs the whole weight and its θ₀ in one place (DESIGN §17). Use ZeRO-1/2 "
                "with alphatoken_mode='ahead', or FSDP2 (fully_shard), which AlphaToken supports")
    if target == "tuned" and any(is_sharded(layer.weight) for layer in layers):
        raise ValueError('target="tuned" tunes a copy of the model, which is not supported with FSDP2-sharded '
                         'weights; use target="validation" (the recommended default) or "batch"')


FSDP2_LAYOUTS = ("root", "accelerate", "head")


def fully_shard_causal_lm(model: nn.Module, layout: str = "root", **fully_shard_kwargs) -> nn.Module:
    """`fully_shard` every decoder layer of a Hugging Face causal LM (`model.model.layers`), then the head's unit by
    `layout`, then the root; returns `model`. `fully_shard_kwargs` (e.g. `mp_policy`) go to every call.

    layout "root": the head (and the embedding) in the root unit. "accelerate": accelerate's FSDP2 layout, the input
    embedding its own unit (untied) and the tail [final norm, head] (with a tied embedding) one unit kept unsharded
    after forward. "head": the head alone in a unit that reshards after forward (`value` works; the masked loss
    refuses it, `check_head_for_training`).
    """
    from torch.distributed.fsdp import fully_shard

    if layout not in FSDP2_LAYOUTS:
        raise ValueError(f"layout must be one of {FSDP2_LAYOUTS}, got {layout!r}")
    for block in model.model.layers:
        fully_shard(block, **fully_shard_kwargs)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    if layout == "accelerate":
        if not tied:
            fully_shard(model.model.embed_tokens, **fully_shard_kwargs)
        tail = [model.model.norm, model.model.embed_tokens, model.lm_head] if tied else [model.model.norm, model.lm_head]
        fully_shard(tail, reshard_after_forward=False, **fully_shard_kwargs)
    elif layout == "head":
        fully_shard(model.lm_head, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model
