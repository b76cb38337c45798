"""TokenValues: the per-token values of one batch, aligned with its labels."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100


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

    def apply(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels with every dropped token set to -100, so any HF loss averages over kept tokens only."""
        if labels.shape != self.mask.shape:
            raise ValueError(f"labels have shape {tuple(labels.shape)}, the values {tuple(self.mask.shape)}")
        return labels.masked_fill(~self.mask.to(labels.device), IGNORE_INDEX)

    @property
    def keep_ratio(self) -> float:
        n = int(self.response.sum())
        return float(self.mask.sum()) / n if n else 0.0

    def to(self, device) -> "TokenValues":
        return TokenValues(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def detach_cpu(self) -> "TokenValues":
        return TokenValues(**{f.name: getattr(self, f.name).detach().cpu() for f in fields(self)})
