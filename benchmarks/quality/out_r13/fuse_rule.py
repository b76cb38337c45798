"""Prototype (round 13): the tuned copy's own loss ℓ_t(θ − U) = ℓ_t(θ) − G_t, rank-fused with the first-order value,
in the real fine-tune. Run as real_finetune.py, with method rule_<NAME> (the defaults, method alphatoken, ranked by
NAME; A is the first-order adaptation under the cosine rule, ranks over the batch's response tokens):

    fuse          (rank(A) + rank(−ℓ_t(θ − U))) / 2, no floor
    fusefloor<τ>  the same, except tokens with G < −τ nats, floored as the defaults floor them (rank(G) − 1)
    fuseagree<τ>  the same, floored only where A < 0 too (as loss_gap_floor_agree)

    python benchmarks/quality/out_r13/fuse_rule.py --task reverse --steps 24 --n-eval 120 --lr 1e-4 \
        --seeds 0 1 2 --methods rule_fuse --out OUT
"""
import math
import sys
from pathlib import Path

import torch

import alphatoken.engine as E

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "out_r11"))
import gap_rule as G  # noqa: E402  (its rule_<NAME> methods, which this adds the fused rules to)

LAST = {}
_loss_gap = E.AlphaToken._loss_gap


def loss_gap(self, batch, head_rows, targets, nll, fuse, weights):
    LAST["nll"] = nll.detach()  # ℓ_t(θ) of the response rows, in the gap's order
    return _loss_gap(self, batch, head_rows, targets, nll, fuse, weights)


def combine_paths(parts, cfg, rms, rank=None):
    gap, rule = parts.get("loss_gap"), G.RULE["rule"]
    if gap is None or not rule.startswith("fuse"):
        return G.combine_paths(parts, cfg, rms, rank)
    rows = G._combine(parts, cfg.replace(loss_gap_floor=math.inf), rms, rank)  # rank(A), no floor
    copy_loss = LAST["nll"].to(gap.dtype) - gap
    adaptation = (rows["adaptation"] + rank(-copy_loss)) / 2
    if rule != "fuse":
        tau = float(rule.lstrip("fuseagrflo"))
        floored = gap < -tau
        if rule.startswith("fuseagree"):
            floored &= parts["adaptation_direct"] < 0
        adaptation = torch.where(floored, rank(gap) - 1, adaptation)
    rows["adaptation"] = adaptation
    rows["total"] = adaptation + cfg.stability_weight * rows["stability"]
    return rows


E.combine_paths = combine_paths
E.AlphaToken._loss_gap = loss_gap

if __name__ == "__main__":
    G.RF.main(sys.argv[1:])
