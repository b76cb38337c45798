"""Round 18 analysis aid: what the library drops at keep 0.6, where the floor's cap and the order's budget are 0.4.

Reads `../out_r12/dump_parts.py` files and scores, at keep 0.6, the library's defaults valued at keep_ratio=0.6,
variants of its floor share and order weight, the keep-0.8 values cut at 0.6 (what detect.py reported before this
round), and the scorers alone; tables as `../out_r16/floor_share.py` prints them (AUROC, then the dropped shares).

    python benchmarks/quality/out_r12/dump_parts.py --worlds toy-add,toy-copy,toy-reverse,toy-sort \
        --seeds 0 1 2 3 4 --out DIR
    python benchmarks/quality/out_r18/keep06.py 'DIR/*.pt'
"""
import sys
from pathlib import Path

QUAL = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(QUAL))
import out_r16.floor_share as F  # noqa: E402
from out_r12.dump_parts import library_rule  # noqa: E402

KEEP = 0.6


def at_keep(keep=KEEP, **fields):
    return library_rule(keep_ratio=keep, **{**dict(loss_gap_floor=2.0, loss_gap_floor_share=1 - keep,
                                                   copy_loss_order_weight=1.0), **fields})


RULES = {
    "the copy's loss": F.copy_loss,
    "the oracle copy's loss": F.oracle_copy_loss,
    "Rho-1 (validation copy)": lambda p: p["loss_gap"],
    "defaults at keep 0.6 (floor share 0.4, order weight 1)": at_keep(),
    "keep 0.8's defaults cut at 0.6 (detect.py before round 18)": at_keep(0.8),
    "floor share 0.2 at keep 0.6": at_keep(loss_gap_floor_share=0.2),
    "no floor at keep 0.6": at_keep(loss_gap_floor=float("inf")),
    "defaults at keep 0.6, copy_loss_weight 1": at_keep(copy_loss_weight=1.0),
    "floor share 0.2, copy_loss_weight 1": at_keep(loss_gap_floor_share=0.2, copy_loss_weight=1.0),
    "no floor, copy_loss_weight 1": at_keep(loss_gap_floor=float("inf"), copy_loss_weight=1.0),
}


def main(pattern: str):
    aurocs, drops = F.score_rules(pattern, RULES, drop_over="response", keep=KEEP)
    columns = F.columns_of(aurocs)
    head = " | ".join(f"{w.replace('-', ' ')} {'θ₀' if s == 'theta0' else 'SFT'}" for w, s in columns)
    F.print_aurocs(aurocs, RULES, columns, head)
    F.print_drops(drops, RULES, columns, head, keep=KEEP)


if __name__ == "__main__":
    main(sys.argv[1])
