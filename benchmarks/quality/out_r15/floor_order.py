"""Round 15 analysis aid: what the loss gap's floor costs the toy detection AUROC, and whether ordering the floored
tokens differently wins it back.

Reads the per-token parts saved by `../out_r12/dump_parts.py` (detect.py's worlds, references and batches) and
scores each rule with the library's own `combine_paths`, AUROC per batch as detect.py does, mean over batches, then
over seeds. Besides the library's default rules it tries two orders of the floored set (tokens with G_t < −τ): by
the copy's own loss (a prototype here), and by the rank the token would have without the floor
(`loss_gap_floor_order="value"`, the first-order value fused with the copy's loss when copy_loss_weight > 0).

    python benchmarks/quality/out_r12/dump_parts.py --worlds toy-add,toy-copy,toy-reverse --seeds 0 1 2 --out DIR
    python benchmarks/quality/out_r15/floor_order.py 'DIR/*.pt'
"""
import collections
import statistics
import sys
from pathlib import Path

import torch

QUAL = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(QUAL))
import detect as D  # noqa: E402
from detect import auroc  # noqa: E402
from out_r12.dump_parts import library_rule, read_dumps, rule_config  # noqa: E402
from alphatoken.combine import combine_paths, percentile_rank as rank  # noqa: E402


def floor_ordered_by_copy_loss(tau: float, copy_weight: float):
    """Floored tokens (G < −τ) below every other, ordered by −ℓ_t(θ_val) (an order the library does not offer);
    the others by rank(A) fused with the copy's loss at `copy_weight`."""
    def rule(parts):
        unfloored = combine_paths(parts, rule_config(copy_loss_weight=copy_weight), D._rms)["adaptation"]
        return torch.where(parts["loss_gap"] < -tau, rank(-parts["copy_loss"]) - 1, unfloored)
    return rule


RULES = {
    "defaults (floor 2)": library_rule(loss_gap_floor=2.0),
    "floor 3": library_rule(loss_gap_floor=3.0),
    "first-order rank alone": library_rule(),
    "copy_loss_weight=1": library_rule(copy_loss_weight=1.0),
    "copy_loss_weight=1, floor 2": library_rule(copy_loss_weight=1.0, loss_gap_floor=2.0),
    "the copy's loss alone": lambda parts: -parts["copy_loss"],
    "w=1, floor 2 ordered by the copy's loss": floor_ordered_by_copy_loss(2.0, 1.0),
    "floor 2 ordered by the unfloored rank (w=0)": library_rule(loss_gap_floor=2.0, loss_gap_floor_order="value"),
    "w=1, floor 2 ordered by the unfloored rank": library_rule(copy_loss_weight=1.0, loss_gap_floor=2.0,
                                                               loss_gap_floor_order="value"),
}


def main(pattern: str):
    aurocs = collections.defaultdict(list)
    floored = collections.defaultdict(lambda: [0, 0, 0, 0])  # noise floored, clean floored, noise, clean
    for world, stage, batches in read_dumps(pattern):
        per_rule = collections.defaultdict(list)
        for batch in batches:
            resp, scored, noise, parts = batch["response"], batch["scored"], batch["noise"], batch["parts"]
            for name, rule in RULES.items():
                value = torch.zeros(resp.shape, dtype=torch.float64)
                value[resp] = rule(parts).double()
                per_rule[name].append(auroc(-value[scored], noise[scored]))
            gap = torch.zeros(resp.shape, dtype=torch.float64)
            gap[resp] = parts["loss_gap"].double()
            below = (gap < -2.0) & scored
            counts = floored[(world, stage)]
            tallies = ((below & noise).sum(), (below & ~noise).sum(), noise.sum(), (scored & ~noise).sum())
            for i, n in enumerate(tallies):
                counts[i] += int(n)
        for name, values in per_rule.items():
            aurocs[(world, stage, name)].append(statistics.mean(values))
    columns = sorted({(w, s) for w, s, _ in aurocs}, key=lambda c: (c[0], c[1] != "theta0"))
    print("| rule | " + " | ".join(f"{w} {s}" for w, s in columns) + " | mean |")
    print("|---" * (len(columns) + 2) + "|")
    for name in RULES:
        values = [statistics.mean(aurocs[c + (name,)]) for c in columns]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {statistics.mean(values):.3f} |")
    print()
    for (world, stage), (fn, fc, n, c) in sorted(floored.items()):
        print(f"{world} {stage}: floored at 2 nats: {fn / n:.2f} of noise, {fc / c:.3f} of clean tokens")


if __name__ == "__main__":
    main(sys.argv[1])
