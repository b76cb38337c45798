"""Round 12 analysis aid: AUROC of candidate rules on the parts dump_parts.py saved, paired by seed against the
best other scorer (mean over batches as detect.py computes it). floor<τ>: the defaults' rule; agree<τ>:
loss_gap_floor_agree; hybrid<τ>: out_r12/hybrid_rule.py's rule (spare only A ≥ 0 with ℓ ≤ τ).

    python benchmarks/quality/out_r12/explore.py DUMP_FOLDER
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from detect import auroc  # noqa: E402
from alphatoken.combine import percentile_rank  # noqa: E402


def cands(r):
    resp = r["response"]
    p = {k: v[resp] for k, v in r["parts"].items()}
    loss, gv, gc = r["loss"][resp], r["gap_val"][resp], r["gap_clean"][resp]
    nd = p["credit_norm_direct"].clamp(min=1e-30)
    cos = p["adaptation_direct"] / nd
    cosc = p["adaptation_causal"] / p["credit_norm_causal"].clamp(min=1e-30)
    rk = percentile_rank
    G = p.get("loss_gap", gv)
    out = {"loss_low": -loss, "rho1_val": gv, "rho1_clean": gc, "rho1_clean_cos": gc / nd, "rho1_val_cos": gv / nd,
           "cos": cos, "raw": p["adaptation_direct"], "G": G}
    for t in (0.5, 1.0, 2.0, 3.0):
        out[f"floor{t:g}"] = torch.where(G < -t, rk(G) - 1, rk(cos))
    for t in (1.0, 3.0):
        out[f"agree{t:g}"] = torch.where((G < -t) & (cos < 0), rk(G) - 1, rk(cos))
        out[f"floorL{t:g}"] = torch.where(G < -t * loss.clamp(min=1.0), rk(G) - 1, rk(cos))
    for t in (2.0, 3.0):
        out[f"lossy{t:g}"] = torch.where((G < -t) & (loss > t), rk(G) - 1, rk(cos))
        out[f"hybrid{t:g}"] = torch.where((G < -t) & ((cos < 0) | (loss > t)), rk(G) - 1, rk(cos))
    out["cos+causal"] = rk(cos) + rk(cosc)
    out["rk(cos)+rk(G)"] = rk(cos) + rk(G)
    out["rk(cos)+rk(-l)"] = rk(cos) + rk(-loss)
    out["min(cos,G)"] = torch.minimum(rk(cos), rk(G))
    out["cos*|C|^.5"] = p["adaptation_direct"] / nd.sqrt()
    # the gap per unit of gradient norm along the displacement direction: exact gap over first-order prediction
    return out, r["noise"][resp] & r["scored"][resp]


OTHERS = ("loss_low", "rho1_val", "rho1_clean", "rho1_clean_cos", "rho1_val_cos")


def main(folder, worlds=("toy-add", "toy-copy", "toy-reverse", "toy-sort"), seeds=(0, 1, 2), others=OTHERS):
    folder = Path(folder)
    for stage in ("theta0", "sft"):
        for w in worlds:
            per = {}
            for s in seeds:
                f = folder / f"{w}_s{s}_{stage}.pt"
                if not f.exists():
                    continue
                recs = torch.load(f, weights_only=False)
                acc = {}
                for r in recs:
                    sc, noise = cands(r)
                    scored = r["scored"][r["response"]]
                    for k, v in sc.items():
                        acc.setdefault(k, []).append(auroc(-v[scored], noise[scored]))
                for k, v in acc.items():
                    per.setdefault(k, []).append(sum(v) / len(v))
            if not per:
                continue
            best_other = max(others, key=lambda k: sum(per[k]))
            print(f"{w} {stage} ({len(per['cos'])} seeds) best other: {best_other} {sum(per[best_other]) / len(per[best_other]):.3f}")
            for k, v in per.items():
                d = [a - b for a, b in zip(v, per[best_other])]
                m = sum(d) / len(d)
                se = (sum((x - m) ** 2 for x in d) / max(1, len(d) - 1) / len(d)) ** 0.5
                print(f"   {k:16s} {sum(v) / len(v):.3f}   vs best other {m:+.4f} ± {se:.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
