"""Round 20 probe: GraNd's two factors under each model, GraNd under the clean-tuned copies, and two ways of fusing
the validation copy's GraNd into the defaults (an idea check, not a library rule).

For one world and seed (built as detect.py builds it: the same references, Fisher and batches), at θ₀ and after the
short SFT, scores every detect.py row at the defaults' rule plus, per response token:

* grand_<ref>, el2n_<ref>, featnorm_<ref>: −‖p − e_y‖·‖h‖, −‖p − e_y‖ and −‖h‖ under θ₀, the validation copy, the
  oracle's clean copy and the library's own copy (h: the head's input at the predicting row);
* def+<w>grand_<ref>: the defaults' values and the copy's GraNd rank-fused, (rank(v) + w·rank(g)) / (1 + w): the
  mask moves;
* ord+<w>grand_<ref>: the defaults' mask kept, each side of the drop budget reordered by rank(o + w·rank(g)), o
  the defaults' own order (an emulation of a third term in DESIGN §3.12's order).

    python benchmarks/quality/out_r20/probe.py toy-copy 0 OUT.csv      # AUROC rows; fusion_table.py reads p_*.csv
"""
import copy
import csv
import sys
import warnings
from pathlib import Path

import torch

QUAL = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(QUAL))
import detect as D  # noqa: E402
from alphatoken.tokens import token_error_norms, token_losses  # noqa: E402

DEF = "at_dispval_all_copy0_floor2cap_order1_direct"  # the defaults' rule in detect.py


def head_stats(model, b):
    """(ℓ_t, ‖p_t − e_{y_t}‖, ‖h_t‖) per (B, T) under `model`, from one forward (detect.logits_and_feature_norms)."""
    logits, feature_norm = D.logits_and_feature_norms(model, b)
    return (token_losses(logits, b["labels"]).double(), token_error_norms(logits, b["labels"]).double(),
            feature_norm)


def prank(x, resp):
    """Percentile ranks in (0, 1] of x over the positions `resp` (0 elsewhere; ties broken by position)."""
    out = torch.zeros_like(x)
    v = x[resp]
    order = v.argsort().argsort().double()
    out[resp] = (order + 1) / len(v)
    return out


def main(world_name: str, seed: int, out_csv: str) -> None:
    torch.set_num_threads(1)
    args = D.build_parser().parse_args([])
    world = D.build_world(world_name, seed, args)
    theta0, fisher, tuned = D.prepare_world(world, seed)
    refs = {"theta0": copy.deepcopy(world.model).eval(), **tuned}
    rules = {k: v for k, v in D.alphatoken_rules().items() if k == DEF}
    rows = []
    for stage in ("theta0", "sft"):
        if stage == "sft":
            world.finetune(world.model, "noisy")
            world.model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores, _ = D.score_world(world, stage, refs, fisher, theta0, seed, rules)
        extra = {}
        for i, batch in enumerate(world.batches):
            b = D._strip(batch)
            _, en, hn = head_stats(world.model, b)
            st = {rn: head_stats(refs[rn], b) for rn in ("val", "clean", "own", "theta0")}
            cand = {
                "el2n": -en, "feat_norm_low": -hn,
                **{f"grand_{rn}": -(st[rn][1] * st[rn][2]) for rn in st},
                **{f"el2n_{rn}": -st[rn][1] for rn in st},
                **{f"featnorm_{rn}": -st[rn][2] for rn in st},
            }
            d = scores[DEF][i]
            rv = b["labels"] != -100  # the defaults' ranks are over every response token
            dropped = d <= 0
            o = torch.where(dropped, d + 1, d)
            for k in ("grand_val", "grand_own", "grand_clean"):
                for w in (0.5, 1.0, 2.0):
                    cand[f"def+{w:g}{k}"] = (prank(d, rv) + w * prank(cand[k], rv)) / (1 + w)
                    o2 = prank(o + w * prank(cand[k], rv), rv)
                    cand[f"ord+{w:g}{k}"] = torch.where(dropped, o2 - 1, o2)
            for k, v in cand.items():
                extra.setdefault(k, []).append(v)
        scores.update(extra)
        res = D.metrics(world, scores)
        for k, r in res.items():
            rows.append({"world": world_name, "seed": seed, "stage": stage, "scorer": k, "auroc": r["auroc"],
                         "git": D.git_revision()})
        shown = [DEF, "grad_norm_low", "grand_val", "grand_own", "def+1grand_val", "ord+1grand_val", "ord+2grand_val",
                 "ord+1grand_own", "ref_loss_val", "ref_loss_clean"]
        print(world_name, seed, stage, {k: round(res[k]["auroc"], 3) for k in shown}, flush=True)
    with open(out_csv, "w") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
