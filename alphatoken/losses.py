"""Losses over response tokens, HF causal-LM convention: logits at position s predict labels[:, s + 1]."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .batch import IGNORE_INDEX, response_mask  # noqa: F401 (re-exported: losses' long-standing names)
from .tokens import token_logprobs  # noqa: F401


def masked_causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Optional[int | torch.Tensor] = None
) -> torch.Tensor:
    """Mean next-token NLL over the labels that are not -100 (the kept tokens).

    With `num_items_in_batch` (gradient accumulation), the sum is divided by that count instead, as
    transformers does. A batch with nothing kept gives a zero loss that still backpropagates.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    kept = shift_labels != IGNORE_INDEX
    if not bool(kept.any()):
        return logits.sum() * 0.0
    rows = shift_logits[kept]
    total = F.cross_entropy(rows if rows.dtype == torch.float64 else rows.float(), shift_labels[kept], reduction="sum")
    return _per_item(total, kept, num_items_in_batch)


def _per_item(total: torch.Tensor, kept: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """`total` divided by the kept count, or by `num_items_in_batch` (the count of a whole accumulation window)."""
    denom = num_items_in_batch if num_items_in_batch is not None else kept.sum()
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return total / denom


def kept_mean_nll(nll: torch.Tensor, kept: torch.Tensor, num_items_in_batch=None, logits: Optional[torch.Tensor] = None):
    """Σ of the per-token NLL `nll` (n,) over `kept` (n,) bool, divided by the kept count (or by
    `num_items_in_batch`): the same loss as `masked_causal_lm_loss` on the masked labels, from NLL rows the caller
    already has. Nothing kept gives a zero loss that still backpropagates (through `logits` when given).
    """
    if not bool(kept.any()):
        return (logits if logits is not None else nll).sum() * 0.0
    return _per_item(nll[kept].sum(), kept, num_items_in_batch)
