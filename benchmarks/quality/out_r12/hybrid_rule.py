"""Prototype (round 12): the floor with a narrower exemption, in the real fine-tune. Run as real_finetune.py, with
method rule_hybrid<τ>: the defaults (method alphatoken) except that a token with G < −τ is floored only where its
first-order value is negative OR its loss under θ is above τ nats, i.e. the floor spares a token only if the model
already predicts it (ℓ_t(θ) ≤ τ) and the tuned step from θ would not raise its loss (the clean tokens the run has
overtaken the fixed copy on), while a first token of a noise run (high loss, first-order value unreliable there:
round 9) stays floored. `loss_gap_floor_agree=True` spares every token with A ≥ 0.

    python benchmarks/quality/out_r12/hybrid_rule.py --task reverse --steps 24 --n-eval 120 --lr 1e-4 \
        --seeds 0 1 2 --methods rule_hybrid3 --out OUT
"""
import math
import sys
from pathlib import Path

import torch

import alphatoken.engine as E

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "out_r11"))
import gap_rule as G  # noqa: E402  (its rule_<NAME> methods, which this adds hybrid<τ> to)


def combine_paths(parts, cfg, rms, rank=None):
    gap, rule = parts.get("loss_gap"), G.RULE["rule"]
    if gap is None or not rule.startswith("hybrid"):
        return G.combine_paths(parts, cfg, rms, rank)
    tau = float(rule[len("hybrid"):])
    rows = G._combine(parts, cfg.replace(loss_gap_floor=math.inf), rms, rank)  # rank(A), no floor
    first_order = parts["adaptation_direct"] / parts["credit_norm_direct"].clamp(min=1e-30)
    nll = gap + parts["copy_loss"]  # ℓ_t(θ) = G_t + ℓ_t(θ_val), both from the gap's forward (no token weights)
    floored = (gap < -tau) & ((first_order < 0) | (nll > tau))
    rows["adaptation"] = torch.where(floored, rank(gap) - 1, rows["adaptation"])
    rows["total"] = rows["adaptation"] + cfg.stability_weight * rows["stability"]
    return rows


E.combine_paths = combine_paths

if __name__ == "__main__":
    G.RF.main(sys.argv[1:])
