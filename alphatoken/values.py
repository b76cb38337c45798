"""TokenValues: the per-token values of one batch, aligned with its labels."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import torch

from .batch import IGNORE_INDEX


@dataclass
class TokenValues:
    """All fields are (B, T), aligned with `labels`; non-response positions hold 0 and mask False.

    total = adaptation + λ·stability = direct + γ·causal.
    """

    adaptation: torch.Tensor
    stability: torch.Tensor
    direct: torch.Tensor
    causal: torch.Tensor
    total: torch.Tensor
    mask: torch.Tensor
    response: torch.Tensor  # bool (B, T): the response tokens that were valued
    # The raw per-path parts before the combination rule (alphatoken.combine): adaptation_direct,
    # adaptation_causal, stability_direct, stability_causal, credit_norm_direct, credit_norm_causal; (B, T) each.
    # None for scorers that have no paths.
    parts: Optional[dict] = None

    def apply(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels with every dropped token set to -100, so any HF loss averages over kept tokens only."""
        if labels.shape != self.mask.shape:
            raise ValueError(f"labels have shape {tuple(labels.shape)}, the values {tuple(self.mask.shape)}")
        return labels.masked_fill(~self.mask.to(labels.device), IGNORE_INDEX)

    @property
    def keep_ratio(self) -> float:
        n = int(self.response.sum())
        return float(self.mask.sum()) / n if n else 0.0

    def _map(self, fn) -> "TokenValues":
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                out[f.name] = {k: fn(v) for k, v in value.items()}
            else:
                out[f.name] = None if value is None else fn(value)
        return TokenValues(**out)

    def to(self, device) -> "TokenValues":
        return self._map(lambda x: x.to(device))

    def detach_cpu(self) -> "TokenValues":
        return self._map(lambda x: x.detach().cpu())


@dataclass
class StepResult:
    """What one training step of a valuer computed (`AlphaToken.step`): returned, not left on objects.

    loss: the masked loss to backpropagate. values: the batch's TokenValues.
    logits: the model's full logits, only when a custom loss_fn asked for them (else None).
    kept_rows: (head-input rows, targets) of the kept tokens when the fused head computed the loss: what logging
        needs to recompute their logits chunk by chunk (`AlphaToken.kept_logit_chunks`), else None.
    output: what a custom loss_fn returned beyond the loss (DPO: its `DPOOutput`), else None.
    """

    loss: Any
    values: TokenValues
    logits: Optional[torch.Tensor] = None
    kept_rows: Optional[tuple] = None
    output: Any = None
