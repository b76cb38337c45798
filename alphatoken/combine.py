"""How the per-path values of a token become its total (DESIGN §3): per-path parts in, TokenValues rows out.

For response token t the engine measures, on each path p ∈ {direct, causal}:
    A_p   adaptation  η ⟨C_p, U⟩            (with leave_one_out: η ⟨C_p, U − C_p/n⟩ = A_p − η |C_p|²/n)
    S_p   stability   η gᵀ(F⊙Δ)a − ½η² (g⊙g)ᵀF(a⊙a), summed over the path's layers
    |C_p| the Frobenius norm of the path's credit, √(Σ_l |g_l|² |a_l|²) (a rank-1 credit per layer)
and combines them as

    cosine:     A_p ← A_p / |C_p|              (the alignment of the token's step with U, not its size)
    normalize:  A ← A / RMS(A), S ← S / RMS(S) over the batch's response tokens (signs kept)
    adaptation = A_direct + γ A_causal,  stability = S_direct + γ S_causal
    direct = A_direct + λ S_direct,      causal = A_causal + λ S_causal
    total = adaptation + λ·stability = direct + γ·causal                          (combine="linear")

combine="rank" fuses the two objectives by rank instead of by value: adaptation and stability are replaced by
their percentile ranks among the batch's response tokens (in (0, 1], highest value → 1; equal values share
their average rank; an objective that is 0 for every token, e.g. without a Fisher, stays 0), and
total = rank(adaptation) + λ·rank(stability). A heavy-tailed objective then cannot drown the other, whatever its
scale. direct and causal keep the per-path linear values (direct + γ·causal is then not the total).

With the tuned target's loss gap G (part "loss_gap", alphatoken/gap.py, DESIGN §3.10) and a margin m < 1, the
ranked adaptation is min(rank(adaptation), rank(G) + m): the exact gap vetoes a token it ranks more than m lower.
With a finite floor τ (nats), a token whose gap G < −τ (and, with loss_gap_floor_agree, whose adaptation before
ranking is negative too) gets rank(G) − 1 instead, in (−1, 0]: below every token that is not floored, the most
negative gap lowest; with loss_gap_floor_order="value" it gets r − 1 instead, r its ranked adaptation before the
floor, so the floored tokens keep among themselves the order they would have had without it. With
loss_gap_floor_share s < 1 only tokens whose rank(G) <= s are floored (the drop budget's most negative gaps; the
default s is 1 − keep_ratio): past the budget the floor decides nothing in selection, so those tokens keep their value.
With loss_gap_floor_copy_share q < 1 a floored token must also have rank(−ℓ_t(θ_val)) <= q: the copy finds it among
the batch's least likely tokens, not merely less likely than the run does.

With the tuned copy's own loss ℓ_t(θ_val) (part "copy_loss", DESIGN §3.11) and copy_loss_weight w > 0, the ranked
adaptation is first (rank(adaptation) + w·rank(−ℓ_t(θ_val))) / (1 + w), in (0, 1], before the veto and the floor.

With copy_loss_order_weight w_o > 0 under selection="batch" (DESIGN §3.12), the tokens the value above puts in the
drop budget, rank <= 1 − keep_ratio, stay there, and both sets are reordered by o = rank((a + w_o·rank(−ℓ_t(θ_val)))
/ (1 + w_o)), a the ranked adaptation before the veto and the floor: o − 1 inside the budget, o outside it. The
tokens dropped are the same (with λ = 0 and no forced keeps inside the budget); their order is the copy's loss fused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class PathValues:
    """Adaptation, stability and squared credit norm of every response token on one path, (n,) each."""

    adaptation: torch.Tensor
    stability: torch.Tensor
    square_norm: torch.Tensor

    @classmethod
    def zeros(cls, n: int, device, dtype=torch.float32) -> "PathValues":
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        zero = torch.zeros(n, dtype=dtype, device=device)
        return cls(zero, zero.clone(), zero.clone())

    @classmethod
    def zeros_like(cls, other: "PathValues") -> "PathValues":
        return cls(*(torch.zeros_like(x) for x in (other.adaptation, other.stability, other.square_norm)))

    def add_(self, adaptation: torch.Tensor, stability: torch.Tensor, square_norm: torch.Tensor) -> None:
        self.adaptation += adaptation.to(self.adaptation.dtype)
        self.stability += stability.to(self.stability.dtype)
        self.square_norm += square_norm.to(self.square_norm.dtype)


def credit_square_norm(a: Optional[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """|g_t a_tᵀ|²_F = |g_t|² |a_t|² per row (a=None: an embedding, whose a_t is one-hot)."""
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    out = g.to(dtype).pow(2).sum(-1)
    if a is not None:
        out = out * a.to(dtype).pow(2).sum(-1)
    return out


def _divide(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return torch.where(norm > 0, x / norm.clamp(min=torch.finfo(norm.dtype).tiny), torch.zeros_like(x))


def combine_paths(parts: dict, cfg, rms: Callable[[torch.Tensor], torch.Tensor],
                  rank: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
    """{adaptation, stability, direct, causal, total} (n,) from the parts (see the module docstring).

    parts: adaptation_direct, adaptation_causal, stability_direct, stability_causal, credit_norm_direct,
    credit_norm_causal, and optionally loss_gap (the tuned copy's exact gap, used under combine="rank" with a
    loss_gap_margin below 1 or a finite loss_gap_floor) and copy_loss (the copy's own loss ℓ_t(θ_val), used under
    combine="rank" with copy_loss_weight > 0). rms: the root mean square over the batch's response
    tokens; rank: the percentile rank among them (default `percentile_rank`); both over every rank's tokens under
    global selection.
    """
    gamma, lam = cfg.causal_weight, cfg.stability_weight
    adapt_d, adapt_c = parts["adaptation_direct"], parts["adaptation_causal"]
    stab_d, stab_c = parts["stability_direct"], parts["stability_causal"]
    if cfg.cosine:
        adapt_d = _divide(adapt_d, parts["credit_norm_direct"])
        adapt_c = _divide(adapt_c, parts["credit_norm_causal"])
    if cfg.normalize:
        rms_a = rms(adapt_d + gamma * adapt_c)
        rms_s = rms(stab_d + gamma * stab_c)
        if rms_a > 0:
            adapt_d, adapt_c = adapt_d / rms_a, adapt_c / rms_a
        if rms_s > 0:
            stab_d, stab_c = stab_d / rms_s, stab_c / rms_s
    rows = {
        "adaptation": adapt_d + gamma * adapt_c,
        "stability": stab_d + gamma * stab_c,
        "direct": adapt_d + lam * stab_d,
        "causal": adapt_c + lam * stab_c,
    }
    rows["total"] = rows["direct"] + gamma * rows["causal"]
    if getattr(cfg, "combine", "linear") == "rank":
        rank = rank or percentile_rank
        adaptation_value = rows["adaptation"]
        for key in ("adaptation", "stability"):  # an objective that is 0 everywhere (no target, no Fisher) stays 0
            x = rows[key]
            rows[key] = torch.where((x == 0).all(), torch.zeros_like(x), rank(x))
        copy_loss, copy_weight = parts.get("copy_loss"), getattr(cfg, "copy_loss_weight", None) or 0.0
        copy_share = getattr(cfg, "loss_gap_floor_copy_share", None)
        order_weight = getattr(cfg, "copy_loss_order_weight", None) or 0.0
        asks_copy = copy_weight > 0 or order_weight > 0 or (copy_share is not None and copy_share < 1)
        # rank(−ℓ_t(θ_val)) once for every rule that reads it: under global selection a rank gathers every rank's values
        copy_rank = rank(-copy_loss) if copy_loss is not None and asks_copy else None
        if copy_rank is not None and copy_weight > 0:  # the tuned copy's own loss, rank-fused (§3.11)
            rows["adaptation"] = (rows["adaptation"] + copy_weight * copy_rank) / (1 + copy_weight)
        before_floor = rows["adaptation"]
        gap = parts.get("loss_gap")  # the tuned copy's exact gap (§3.10): a rank veto and / or a floor in nats
        margin, floor = getattr(cfg, "loss_gap_margin", None), getattr(cfg, "loss_gap_floor", None)
        veto = gap is not None and margin is not None and margin < 1
        floored = gap is not None and floor is not None and math.isfinite(floor)
        if veto or floored:
            gap_rank = rank(gap)  # once: under global selection a rank gathers every rank's values
            if veto:
                rows["adaptation"] = torch.minimum(rows["adaptation"], gap_rank + margin)
            if floored:
                below = gap < -floor
                share = getattr(cfg, "loss_gap_floor_share", None)
                if share is not None and share < 1:  # only the drop budget's most negative gaps (§3.10, round 16)
                    below = below & (gap_rank <= share + 1e-9)
                if copy_share is not None and copy_share < 1 and copy_rank is not None:  # the copy's loss agrees
                    below = below & (copy_rank <= copy_share + 1e-9)
                if getattr(cfg, "loss_gap_floor_agree", False):  # the first-order value must say so too
                    below = below & (adaptation_value < 0)
                by_value = getattr(cfg, "loss_gap_floor_order", "gap") == "value"
                floored_key = rows["adaptation"] if by_value else gap_rank
                rows["adaptation"] = torch.where(below, floored_key - 1, rows["adaptation"])
        if copy_rank is not None and order_weight > 0 and getattr(cfg, "selection", None) == "batch":
            # the order inside the dropped set and inside the kept set (§3.12); which tokens are dropped stays
            dropped = rank(rows["adaptation"]) <= 1.0 - cfg.keep_ratio + 1e-9
            order = rank((before_floor + order_weight * copy_rank) / (1 + order_weight))
            rows["adaptation"] = torch.where(dropped, order - 1, order)
        rows["total"] = rows["adaptation"] + lam * rows["stability"]
    return rows


def percentile_rank(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry among all of `x`, scaled to (0, 1]: the largest gets 1, the smallest 1/n; equal values
    share the average of their ranks (deterministic, independent of position)."""
    n = x.numel()
    if n == 0:
        return x.clone()
    values, order = torch.sort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).to(x.dtype)
    average = last - (counts.to(x.dtype) - 1) / 2  # mean of the 1-based ranks first..last of each run
    ranks = torch.empty(n, dtype=x.dtype, device=x.device)
    ranks[order] = average[inverse]
    return ranks / n
