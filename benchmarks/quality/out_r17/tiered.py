"""Round 17 analysis aid: the mask of the defaults, the order of a detector; and a floor that asks the copy's loss.

Selection reads only which tokens fall in the drop budget; detection reads the whole order. This scores rules that
keep the defaults' dropped set at keep 0.8 (the capped floor of DESIGN §3.10) and order the tokens inside the
dropped set and inside the kept set by another score (`tiered`; in the library `copy_loss_order_weight`, §3.12),
and floors that also ask the copy's own loss (`floor(copy_share=)`; `loss_gap_floor_copy_share`), against the
scorers alone (BASELINES) and the defaults. The rows named "library: ..." are the library's own combine_paths.

    python benchmarks/quality/out_r12/dump_parts.py --worlds toy-add,toy-copy,toy-reverse,toy-sort \
        --seeds 0 1 2 3 4 --out DIR
    python benchmarks/quality/out_r12/dump_parts.py --worlds real-capitals,real-reverse --seeds 0 1 --out DIR
    python benchmarks/quality/out_r17/tiered.py 'DIR/*.pt'
"""
import statistics
import sys
from pathlib import Path

import torch

QUAL = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(QUAL))
from alphatoken.combine import percentile_rank  # noqa: E402
from out_r12.dump_parts import library_rule  # noqa: E402
from out_r16.floor_share import (KEEP, columns_of, copy_loss, oracle_copy_loss, print_aurocs,  # noqa: E402
                                 print_drops, score_rules)

DEFAULTS = library_rule(loss_gap_floor=2.0, loss_gap_floor_share=1 - KEEP)


def tiered(select, order):
    """The lowest (1 − KEEP) of `select` below everything else, each tier ordered by `order`."""
    def rule(p):
        s, o = select(p).double(), order(p).double()
        n_drop = int((1 - KEEP) * s.numel())
        dropped = torch.zeros_like(s, dtype=torch.bool)
        if n_drop:
            dropped[torch.argsort(s, stable=True)[:n_drop]] = True
        r = percentile_rank(o)
        return torch.where(dropped, r - 1, r)
    return rule


def floor(tau=2.0, share=1 - KEEP, copy_share=None, copy_nats=None, weight=0.0):
    """The capped floor (G < −τ, rank(G) <= share, ordered by the gap) over the first-order rank fused with the copy's
    loss at `weight`; with copy_share / copy_nats a token is floored only where the copy's own loss also ranks it in
    the lowest copy_share / exceeds copy_nats nats."""
    base = library_rule(copy_loss_weight=weight)

    def rule(p):
        g, c = p["loss_gap"].double(), p["copy_loss"].double()
        g_rank = percentile_rank(g)
        below = (g < -tau) & (g_rank <= share + 1e-9)
        if copy_share is not None:
            below &= percentile_rank(-c) <= copy_share + 1e-9
        if copy_nats is not None:
            below &= c > copy_nats
        return torch.where(below, g_rank - 1, base(p).double())
    return rule


BASELINES = {
    "−ℓ": lambda p: -p["loss"],
    "Rho-1 (validation copy)": lambda p: p["loss_gap"],
    "Rho-1 (oracle copy)": lambda p: p["gap_clean"],
    "the copy's loss": copy_loss,
    "the oracle copy's loss": oracle_copy_loss,
}
RULES = {
    **BASELINES,
    "defaults": DEFAULTS,
    "w = 1, no floor": library_rule(copy_loss_weight=1.0),
    "w = 3, no floor": library_rule(copy_loss_weight=3.0),
    "tiered: defaults' mask, order copy's loss": tiered(DEFAULTS, copy_loss),
    "tiered: defaults' mask, order w = 1": tiered(DEFAULTS, library_rule(copy_loss_weight=1.0)),
    "tiered: defaults' mask, order w = 3": tiered(DEFAULTS, library_rule(copy_loss_weight=3.0)),
    "floor (check: = defaults)": floor(),
    "floor, copy's loss in its lowest 0.2": floor(copy_share=0.2),
    "floor, copy's loss in its lowest 0.3": floor(copy_share=0.3),
    "floor, copy's loss in its lowest 0.5": floor(copy_share=0.5),
    "floor, copy's loss > 2 nats": floor(copy_nats=2.0),
    "floor, copy's loss > 4 nats": floor(copy_nats=4.0),
    "floor, copy's loss lowest 0.3, w = 1": floor(copy_share=0.3, weight=1.0),
    "floor, copy's loss lowest 0.2, w = 1": floor(copy_share=0.2, weight=1.0),
    "floor, copy's loss in its lowest 0.15": floor(copy_share=0.15),
    "floor, copy's loss in its lowest 0.1": floor(copy_share=0.1),
    "floor τ=1, copy's loss in its lowest 0.2": floor(tau=1.0, copy_share=0.2),
    "library: loss_gap_floor_copy_share=0.2": library_rule(loss_gap_floor=2.0, loss_gap_floor_share=1 - KEEP,
                                                           loss_gap_floor_copy_share=0.2),
    "library: copy_loss_order_weight=1": library_rule(loss_gap_floor=2.0, loss_gap_floor_share=1 - KEEP,
                                                      copy_loss_order_weight=1.0),
    "library: copy_loss_order_weight=0.5": library_rule(loss_gap_floor=2.0, loss_gap_floor_share=1 - KEEP,
                                                        copy_loss_order_weight=0.5),
    "library: copy_loss_order_weight=2": library_rule(loss_gap_floor=2.0, loss_gap_floor_share=1 - KEEP,
                                                      copy_loss_order_weight=2.0),
    "library: copy share 0.2, order weight 1": library_rule(loss_gap_floor=2.0, loss_gap_floor_share=1 - KEEP,
                                                            loss_gap_floor_copy_share=0.2, copy_loss_order_weight=1.0),
    "tiered: copy-share mask, order w = 1": tiered(floor(copy_share=0.2), library_rule(copy_loss_weight=1.0)),
    "tiered: copy-share mask, order w = 0.5": tiered(floor(copy_share=0.2), library_rule(copy_loss_weight=0.5)),
    "tiered: defaults' mask, order copy's loss + −ℓ": tiered(
        DEFAULTS, lambda p: percentile_rank(-p["copy_loss"].double()) + percentile_rank(-p["loss"].double())),
}


def main(pattern: str):
    aurocs, drops = score_rules(pattern, RULES, drop_over="response")
    columns = columns_of(aurocs)
    head = " | ".join(f"{w.replace('-', ' ')} {'θ₀' if s == 'theta0' else 'SFT'}" for w, s in columns)
    print_aurocs(aurocs, RULES, columns, head)
    print("\nPaired over seeds against the best baseline of each column (Δ ± standard error)")
    print(f"| rule | {head} |\n" + "|---" * (len(columns) + 1) + "|")
    best = {c: max(BASELINES, key=lambda b: statistics.mean(aurocs[c + (b,)])) for c in columns}
    for name in RULES:
        if name in BASELINES:
            continue
        cells = []
        for c in columns:
            d = [x - y for x, y in zip(aurocs[c + (name,)], aurocs[c + (best[c],)])]
            se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
            cells.append(f"{statistics.mean(d):+.3f} ± {se:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| (best baseline) | " + " | ".join(best[c] for c in columns) + " |")
    print_drops(drops, RULES, columns, head)


if __name__ == "__main__":
    main(sys.argv[1])
