"""Batches and models as the valuer sees them: the label convention, the batch check, the model behind a wrapper,
the model's forward arguments, and the rows of a flattened (B·T) batch that the capture reads (DESIGN §2.1).

Row arithmetic, HF causal-LM convention (logits at position s predict labels[:, s + 1]): the response token at
(b, t) is predicted by row `b·T + t − 1` of the flattened (B·T, ·) head input ("head rows") and sits at row
`b·T + t` ("token rows"); `nonpad_rows` are every position the attention mask keeps.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

IGNORE_INDEX = -100  # the label of a token no loss is taken on
BATCH_KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "token_type_ids")


def validate_batch(batch, device) -> dict:
    """Check and move a batch: input_ids and labels (B, T) integer, attention_mask (B, T) if given."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"a batch must be a dict with input_ids and labels, got {type(batch).__name__}")
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ValueError(f"the batch has no {key!r} (keys: {sorted(batch)}); labels are -100 outside the response")
        if not isinstance(batch[key], torch.Tensor) or batch[key].dim() != 2:
            raise ValueError(f"batch[{key!r}] must be a (B, T) tensor, got {getattr(batch[key], 'shape', type(batch[key]))}")
    shape = tuple(batch["input_ids"].shape)
    out = {}
    for key, value in batch.items():
        if key in BATCH_KEYS:
            if tuple(value.shape) != shape:
                raise ValueError(f"batch[{key!r}] has shape {tuple(value.shape)} but input_ids has {shape}")
            out[key] = value.to(device)
    if out["labels"].dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be integer token ids, got {out['labels'].dtype}")
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The causal LM inside a DDP / accelerate / compile wrapper (the wrapper is still what runs forward)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if callable(getattr(model, "get_output_embeddings", None)):
            return model
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def forward_arguments(model: nn.Module) -> frozenset:
    """The batch keys `model`'s forward accepts (every batch key and `use_cache` when it takes **kwargs)."""
    params = inspect.signature(unwrap_model(model).forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return frozenset(params) | (frozenset(BATCH_KEYS) | {"use_cache"} if takes_any else frozenset())


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """The model's forward arguments: no labels (AlphaToken computes its own losses), no cache.

    With left padding and no position_ids, positions are derived from the attention mask so that a padded
    sequence is valued exactly as the unpadded one.
    """
    accepted = forward_arguments(model)
    inputs = {k: v for k, v in batch.items() if k != "labels" and k in accepted}
    mask = batch.get("attention_mask")
    if mask is not None and "position_ids" not in batch and "position_ids" in accepted and bool((mask[:, 0] == 0).any()):
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    if "use_cache" in accepted:
        inputs["use_cache"] = False
    return inputs


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions t >= 1 whose label is a response token."""
    mask = labels != IGNORE_INDEX
    mask[:, 0] = False
    return mask


@dataclass(frozen=True)
class ResponseRows:
    """The response tokens of a (B, T) batch: their coordinates (b, t) and their rows in the flattened batch."""

    b: torch.Tensor
    t: torch.Tensor
    T: int

    @property
    def n(self) -> int:
        return self.b.numel()

    @property
    def head(self) -> torch.Tensor:
        """Rows `b·T + t − 1`: the positions whose logits predict the response tokens."""
        return self.b * self.T + self.t - 1

    @property
    def tokens(self) -> torch.Tensor:
        """Rows `b·T + t`: the response tokens themselves."""
        return self.b * self.T + self.t


def response_rows(response: torch.Tensor) -> ResponseRows:
    """The rows of a (B, T) response mask (one read of the device: `nonzero`)."""
    b, t = response.nonzero(as_tuple=True)
    return ResponseRows(b, t, response.shape[1])


def nonpad_rows(batch: dict) -> torch.Tensor:
    """Rows of the flattened (B·T) batch the attention mask keeps (every row without a mask)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return (mask.reshape(-1) > 0).nonzero().squeeze(1)
    return torch.arange(batch["input_ids"].numel(), device=batch["input_ids"].device)
