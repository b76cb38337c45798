"""Token selection (DESIGN §4): which response tokens keep their loss.

Ranking is by `total`, highest first; ties break by position (earlier batch row, then earlier token first),
so the same values always give the same mask. Every sequence with response tokens keeps at least
`min(min_keep_per_sequence, its response length)` of its best tokens.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .config import AlphaTokenConfig


def _ranked_positions(total: torch.Tensor, response: torch.Tensor):
    """Flat positions of response tokens in selection order, their sequence, and their rank in the sequence."""
    B, T = response.shape
    flat = response.reshape(-1).nonzero().squeeze(1)  # ascending position order
    scores = total.reshape(-1)[flat].float()
    order = flat[torch.sort(-scores, stable=True).indices]
    seq = torch.div(order, T, rounding_mode="floor")
    by_seq = torch.sort(seq, stable=True).indices
    counts = torch.bincount(seq, minlength=B)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(order.numel(), device=order.device) - starts[seq[by_seq]]
    rank = torch.empty_like(rank_sorted)
    rank[by_seq] = rank_sorted
    return order, seq, rank, counts


def select_local(
    total: torch.Tensor, response: torch.Tensor, cfg: AlphaTokenConfig, protected: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The keep-mask (B, T) for one batch, without looking at other ranks.

    protected: (B, T) bool, response tokens kept whatever their value (they use up budget first).
    """
    if total.shape != response.shape:
        raise ValueError(f"total has shape {tuple(total.shape)} but response has {tuple(response.shape)}")
    mask = torch.zeros(response.shape, dtype=torch.bool, device=response.device)
    n = int(response.sum())
    if n == 0:
        return mask
    order, seq, rank, counts = _ranked_positions(total, response)
    min_keep = torch.clamp(counts, max=cfg.min_keep_per_sequence)[seq]
    forced = rank < min_keep
    if protected is not None:
        forced = forced | protected.reshape(-1)[order]
    if cfg.selection == "batch":
        budget = math.ceil(cfg.keep_ratio * n - 1e-9) - int(forced.sum())
        free = (~forced).nonzero().squeeze(1)[: max(budget, 0)]
        keep = forced.clone()
        keep[free] = True
    elif cfg.selection == "sequence":
        per_seq = torch.ceil(counts.double() * cfg.keep_ratio - 1e-9).long()
        keep = forced | (rank < torch.maximum(per_seq, torch.clamp(counts, max=cfg.min_keep_per_sequence))[seq])
    else:  # "threshold"
        keep = forced | (total.reshape(-1)[order] > cfg.threshold)
    mask.view(-1)[order[keep]] = True
    return mask


def protected_tokens(labels: torch.Tensor, response: torch.Tensor, cfg: AlphaTokenConfig) -> Optional[torch.Tensor]:
    """(B, T) bool: response tokens whose id is in `cfg.always_keep_token_ids`; None when there are none."""
    if not cfg.always_keep_token_ids:
        return None
    ids = torch.tensor(cfg.always_keep_token_ids, device=labels.device, dtype=labels.dtype)
    return response & torch.isin(labels, ids)


def select_tokens(
    total: torch.Tensor, response: torch.Tensor, cfg: AlphaTokenConfig, protected: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The keep-mask (B, T). With `cfg.global_selection` under torch.distributed, ranks select together."""
    if cfg.global_selection:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from .distributed import select_global

            if protected is None:
                return select_global(total, response, cfg, select_local)
            # protected tokens travel as +inf values: they rank first, exactly as forced keeps do locally
            lifted = total.masked_fill(protected, float("inf"))
            return select_global(lifted, response, cfg, select_local)
    return select_local(total, response, cfg, protected)
