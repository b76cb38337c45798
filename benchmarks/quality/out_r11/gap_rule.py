"""Prototype (round 11): other ways for the tuned copy's exact loss gap G (nats) to enter the defaults' ranking,
in the real fine-tune. Run as real_finetune.py, with methods rule_NAME (the defaults, method alphatoken, with the rule NAME):

    min       the defaults: min(rank(A), rank(G) + 0.1)
    nats<τ>   rank(A), except tokens with G < −τ nats, which go below every other token, the most negative G first
    natsmin<τ> the defaults' value, except tokens with G < −τ nats, as in nats<τ>
    gap       rank(G) alone (Rho-1's excess loss with the valuer's own tuned copy as the reference)

    python benchmarks/quality/out_r11/gap_rule.py --task capitals --steps 24 --n-eval 30 --lr 1e-4 \
        --seeds 0 1 2 --methods rule_nats1 --out OUT
"""
import sys
from pathlib import Path

import torch

import alphatoken.engine as E

QUAL = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(QUAL))
import real_finetune as RF  # noqa: E402

RULE = {"rule": "min"}
_combine = E.combine_paths


def combine_paths(parts, cfg, rms, rank=None):
    gap = parts.get("loss_gap")
    rule = RULE["rule"]
    if gap is None or rule == "min":
        return _combine(parts, cfg, rms, rank)
    rows = _combine(parts, cfg.replace(loss_gap_margin=1.0), rms, rank)  # rank(A), no veto
    rank_a, rank_g = rows["adaptation"], rank(gap)
    if rule == "gap":
        adaptation = rank_g
    elif rule.startswith("natsmin"):
        tau = float(rule[7:])
        adaptation = torch.where(gap < -tau, rank_g - 1, torch.minimum(rank_a, rank_g + 0.1))
    elif rule.startswith("nats"):
        tau = float(rule[4:])
        adaptation = torch.where(gap < -tau, rank_g - 1, rank_a)
    else:
        raise ValueError(rule)
    rows["adaptation"] = adaptation
    rows["total"] = adaptation + cfg.stability_weight * rows["stability"]
    return rows


E.combine_paths = combine_paths
_build = RF.build


def build(method, model, tokenizer, data, args, seed, device):
    """rule_NAME: the alphatoken method ranked by rule NAME; any other method as real_finetune builds it (and, as
    "min" passes through, with the library's own ranking if it values tokens)."""
    RULE["rule"] = method[5:] if method.startswith("rule_") else "min"
    return _build("alphatoken" if method.startswith("rule_") else method, model, tokenizer, data, args, seed, device)


RF.build = build

if __name__ == "__main__":
    RF.main(sys.argv[1:])
