"""Round 13 analysis aid: the tuned copy's own loss ℓ_t(θ_val) as a detector, alone and rank-fused with the
first-order value (copy_loss_weight, DESIGN §3.11), on the parts out_r12/dump_parts.py saved; AUROC per world and
stage, paired by seed against the best other scorer, with the copies' own losses counted among the others.

    python benchmarks/quality/out_r12/dump_parts.py --worlds toy-add,toy-copy,toy-reverse,toy-sort --seeds 0 1 2 --out DIR
    python benchmarks/quality/out_r12/dump_parts.py --worlds real-capitals,real-reverse --seeds 0 1 --out DIR
    python benchmarks/quality/out_r13/copy_loss_explore.py DIR
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "out_r12"))
import explore as E  # noqa: E402  (its paired read-out; this replaces the candidate rules)
from alphatoken.combine import percentile_rank as rk  # noqa: E402

OTHERS = ("loss_low", "rho1_val", "rho1_clean", "rho1_clean_cos", "rho1_val_cos", "ref_loss_val", "ref_loss_clean")


def cands(r):
    resp = r["response"]
    p = {k: v[resp] for k, v in r["parts"].items()}
    loss, gap, gap_clean = r["loss"][resp], p["loss_gap"], r["gap_clean"][resp]
    norm = p["credit_norm_direct"].clamp(min=1e-30)
    cos = p["adaptation_direct"] / norm
    copy_loss = loss - gap  # ℓ_t(θ_val): the copy's own loss (the engine's part "copy_loss")
    out = {"loss_low": -loss, "rho1_val": r["gap_val"][resp], "rho1_clean": gap_clean,
           "rho1_clean_cos": gap_clean / norm, "rho1_val_cos": r["gap_val"][resp] / norm,
           "ref_loss_val": -copy_loss, "ref_loss_clean": -(loss - gap_clean),
           "cos": cos, "floor3 (defaults)": torch.where(gap < -3, rk(gap) - 1, rk(cos)),
           "agree3": torch.where((gap < -3) & (cos < 0), rk(gap) - 1, rk(cos))}
    for w in (0.5, 1.0, 3.0):
        fused = (rk(cos) + w * rk(-copy_loss)) / (1 + w)
        out[f"copy{w:g}"] = fused
        out[f"copy{w:g}_floor3"] = torch.where(gap < -3, rk(gap) - 1, fused)
        out[f"copy{w:g}_agree3"] = torch.where((gap < -3) & (cos < 0), rk(gap) - 1, fused)
    return out, r["noise"][resp] & r["scored"][resp]


def main(folder):
    E.cands = cands
    worlds = ("toy-add", "toy-copy", "toy-reverse", "toy-sort", "real-capitals", "real-reverse")
    E.main(folder, worlds=worlds, seeds=tuple(range(10)), others=OTHERS)


if __name__ == "__main__":
    main(sys.argv[1])
