"""The tuned target (DESIGN §3.6): U = θ − θ_val, the displacement from a copy of the model tuned on the clean
validation batches.

One gradient of the validation loss is where the validation target's signal ends; a reference tuned on the same
batches for many optimizer steps carries more of it (it is what Rho-1's reference has). With U_l = W_l − W_l^val
for every tracked layer, a token's adaptation ⟨C_t, U⟩ = η⟨∇ℓ_t, θ − θ_val⟩ ≈ η[ℓ_t(θ) − ℓ_t(θ_val)]: to first
order, how much the tuned model lowers the token's loss, on both paths and with the same ghost kernels as every
other target. It has the validation gradient's sign convention (a step along −U moves θ toward θ_val), so every
combination rule reads it unchanged. The tuned weights are stored like θ₀ (an `Anchor`); U is formed per layer
when the layer's values need it and is exactly 0 for a layer the tuning did not move.
"""
from __future__ import annotations

import copy
import itertools
import math
import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from .anchor import Anchor
from .config import DEFAULT_TUNE_LR
from .batch import IGNORE_INDEX, model_inputs, unwrap_model, validate_batch
from .credits import Direction
from .layers import TrackedLayer
from .progress import progress as progress_bar


def run_learning_rate(optimizer) -> Optional[float]:
    """The learning rate the run's `optimizer` steps at, when the copy's AdamW can take it over, else None.

    Read from its first parameter group: `initial_lr` (set by a learning-rate scheduler, so a warm-up's 0 at the
    first step is not what is read) or `lr`. Only for an Adam-like optimizer (its class name contains "adam":
    torch's Adam / AdamW, fused and 8-bit variants): an SGD rate means something else to AdamW. Wrappers that hold
    the real optimizer as `.optimizer` (accelerate's AcceleratedOptimizer, DeepSpeed's) are looked through.
    """
    inner = optimizer
    for _ in range(4):
        if _adam_like(inner) or not hasattr(inner, "optimizer"):
            break
        inner = inner.optimizer
    if not _adam_like(inner) or not getattr(inner, "param_groups", None):
        return None
    group = inner.param_groups[0]
    lr = float(group.get("initial_lr", group.get("lr", 0.0)))
    return lr if math.isfinite(lr) and lr > 0 else None


def _adam_like(optimizer) -> bool:
    return "adam" in type(optimizer).__name__.lower()


def copy_learning_rate(tune_lr: Optional[float], optimizer, stacklevel: int = 3) -> float:
    """The tuned copy's learning rate: `tune_lr` when set, else the run's (`run_learning_rate(optimizer)`), else
    DEFAULT_TUNE_LR with a warning saying why and what to pass (DESIGN §3.6: the copy is best tuned like the run)."""
    if tune_lr is not None:
        return tune_lr
    if optimizer is None:
        why = "the valuer was given no optimizer"
    else:
        lr = run_learning_rate(optimizer)
        if lr is not None:
            return lr
        why = (f"the optimizer ({type(optimizer).__name__}) is not Adam-like or has no positive learning rate, so "
               "its rate does not carry over to the copy's AdamW")
    warnings.warn(f"AlphaToken: the tuned target's copy is tuned at tune_lr={DEFAULT_TUNE_LR:g} ({why}); pass "
                  "optimizer=<the run's optimizer> or set tune_lr to the run's learning rate: the copy is best tuned "
                  "like the run (DESIGN §3.6)", stacklevel=stacklevel)
    return DEFAULT_TUNE_LR


def tune_on_validation(model: nn.Module, batches, steps: int, lr: float, progress: Optional[bool] = None,
                       max_grad_norm: float = 1.0) -> dict:
    """The state dict of a copy of `model` trained `steps` AdamW steps (learning rate `lr`, no weight decay,
    gradient norm clipped at `max_grad_norm`) on the mean response NLL of `batches`, cycled one per step.

    progress: show a bar (default: on a terminal). Only the parameters that require a gradient in `model` are trained (the same ones the user fine-tunes: all,
    the last blocks, or LoRA adapters); `model` itself is not touched. The copy is freed on return.
    """
    if steps < 1:
        raise ValueError(f"tune_steps must be >= 1, got {steps}")
    batches = [batches] if isinstance(batches, dict) else list(batches)
    if not batches:
        raise ValueError("tuning the reference needs at least one validation batch")
    tuned = copy.deepcopy(unwrap_model(model))
    params = [p for p in tuned.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter that requires a gradient, so tuning cannot move it")
    device = params[0].device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    was_training = tuned.training
    tuned.train()
    cycle = itertools.cycle(batches)
    for _ in progress_bar(range(steps), desc="tuning the target reference", enabled=progress):
        batch = validate_batch(next(cycle), device)
        logits = tuned(**model_inputs(tuned, batch)).logits
        labels = batch["labels"]
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                           ignore_index=IGNORE_INDEX)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the validation loss became {float(loss)} while tuning the target reference: "
                                     f"lower tune_lr (now {lr})")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    tuned.train(was_training)
    state = {k: v.detach() for k, v in tuned.state_dict().items()}
    del tuned, opt
    return state


class TunedDirections:
    """Per-layer U = W − W^val, formed on demand (`get(index)`, as the engine reads its directions) from the
    tuned weights held in `anchor`; None for a layer the tuning did not move (its adaptation is 0)."""

    def __init__(self, layers: list[TrackedLayer], anchor: Anchor):
        self.layers = layers
        self.anchor = anchor

    def get(self, index: int) -> Optional[Direction]:
        layer = self.layers[index]
        delta = self.anchor.delta(layer)
        if delta is None:
            return None
        return Direction(matrix=delta if layer.kind == "embedding" else layer.weight_matrix(delta))


def tuned_anchor(layers: list[TrackedLayer], model: nn.Module, tuned, validation: Optional[Iterable], steps: int,
                 lr: float, device=None, dtype=None) -> Anchor:
    """The tuned weights of the tracked layers: from `tuned` (a module or a state dict keyed like
    `model.state_dict()`) when given, else by `tune_on_validation` on the validation batches."""
    if tuned is None:
        if validation is None:
            raise ValueError('target="tuned" needs validation=<a few clean target-task batches> (a copy of the '
                             'model is tuned on them) or tuned=<a model or state dict already tuned on them>')
        tuned = tune_on_validation(model, validation, steps, lr)
    return Anchor(layers, tuned, device, dtype)
