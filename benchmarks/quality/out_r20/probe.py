"""Round 20 probe: GraNd's two factors under each clean-tuned copy, and two ways of fusing the validation copy's
GraNd into the defaults (an idea check, not a library rule).

For one world and seed (built as detect.py builds it: the same references, Fisher and batches), at θ₀ and after the
short SFT, writes every detect.py row at the defaults' rule (GraNd under each copy is detect.py's
`ref_grad_norm_<ref>`) plus, per response token:

* el2n_<ref>, featnorm_<ref>: GraNd's two factors under the validation copy, the oracle's clean copy and the
  library's own copy, −‖p_ref − e_y‖ and −‖h_ref‖ (h: the head's input at the predicting row);
* def+<w>:<ref>: the defaults' values and the copy's GraNd rank-fused, (rank(v) + w·rank(g)) / (1 + w): the mask
  moves;
* ord+<w>:<ref>: the defaults' mask kept, each side of the drop budget reordered by rank(o + w·rank(g)), o the
  defaults' own order (an emulation of a third term in DESIGN §3.12's order).

Ranks are the library's percentile ranks over the batch's response tokens (`alphatoken.combine.percentile_rank`,
ties sharing their average rank).

    python benchmarks/quality/out_r20/probe.py toy-copy 0 OUT/p_toy-copy0.csv     # fusion_table.py reads p_*.csv
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
from alphatoken.combine import percentile_rank  # noqa: E402
from alphatoken.tokens import token_error_norms  # noqa: E402

DEF = "at_dispval_all_copy0_floor2cap_order1_direct"  # the defaults' rule in detect.py
COPIES = ("val", "clean", "own")


def ranked(x: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """(B, T) percentile ranks of x over the response positions (0 elsewhere)."""
    out = torch.zeros_like(x)
    out[response] = percentile_rank(x[response])
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
            cand = {}
            for ref_name in COPIES:  # GraNd's factors under each copy (their product is detect.py's row)
                logits, feature_norm = D.logits_and_feature_norms(refs[ref_name], b)
                cand[f"el2n_{ref_name}"] = -token_error_norms(logits, b["labels"]).double()
                cand[f"featnorm_{ref_name}"] = -feature_norm
            values = scores[DEF][i]
            response = b["labels"] != -100  # the defaults' ranks are over every response token
            dropped = values <= 0
            order = torch.where(dropped, values + 1, values)
            for ref_name in COPIES:
                grand = ranked(scores[f"ref_grad_norm_{ref_name}"][i], response)
                for w in (0.5, 1.0, 2.0):
                    cand[f"def+{w:g}:{ref_name}"] = (ranked(values, response) + w * grand) / (1 + w)
                    reordered = ranked(order + w * grand, response)
                    cand[f"ord+{w:g}:{ref_name}"] = torch.where(dropped, reordered - 1, reordered)
            for k, v in cand.items():
                extra.setdefault(k, []).append(v)
        scores.update(extra)
        res = D.metrics(world, scores)
        for k, r in res.items():
            rows.append({"world": world_name, "seed": seed, "stage": stage, "scorer": k, "auroc": r["auroc"],
                         "git": D.git_revision()})
        shown = [DEF, "grad_norm_low", "ref_grad_norm_val", "ref_loss_val", "def+1:val", "ord+1:val"]
        print(world_name, seed, stage, {k: round(res[k]["auroc"], 3) for k in shown}, flush=True)
    with open(out_csv, "w") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
