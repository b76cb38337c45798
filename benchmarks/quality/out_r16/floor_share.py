"""Round 16 analysis aid: the loss gap's floor capped at the drop budget (`loss_gap_floor_share`), the copy's loss
fused at larger weights without the floor, and what each drops at keep 0.8.

Reads the per-token parts saved by `../out_r12/dump_parts.py` (detect.py's worlds, references and batches; toys and
the real tasks) and scores each rule with the library's own `combine_paths`: AUROC per batch as detect.py does, mean
over batches, then over seeds. A second table gives, at keep 0.8 (the lowest 20 % of each batch dropped), the share
of the noise dropped, of the first tokens of noise runs (what the floor exists to drop first) and of the clean tokens.

    python benchmarks/quality/out_r12/dump_parts.py --worlds toy-add,toy-copy,toy-reverse,toy-sort \
        --seeds 0 1 2 3 4 --out DIR
    python benchmarks/quality/out_r12/dump_parts.py --worlds real-capitals,real-reverse --seeds 0 1 --out DIR
    python benchmarks/quality/out_r16/floor_share.py 'DIR/*.pt'
"""
import collections
import statistics
import sys
from pathlib import Path

import torch

QUAL = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(QUAL))
from detect import auroc  # noqa: E402
from out_r12.dump_parts import library_rule, read_dumps  # noqa: E402

KEEP = 0.8


def copy_loss(p):
    """−ℓ_t(θ_val): the tuned copy's own loss as a score (its gap's forward; §3.11)."""
    return -p["copy_loss"]


def oracle_copy_loss(p):
    """−ℓ_t(θ_clean) = −(ℓ_t(θ_val) + G_t − G_t^clean): the oracle copy's own loss, from the two gaps."""
    return -(p["copy_loss"] + p["loss_gap"] - p["gap_clean"])


RULES = {
    "the copy's loss (validation copy)": copy_loss,
    "the oracle copy's loss": oracle_copy_loss,
    "round-15 defaults (floor 2, uncapped)": library_rule(loss_gap_floor=2.0),
    "floor 2 capped at the budget (round-16 defaults)": library_rule(loss_gap_floor=2.0, loss_gap_floor_share=1 - KEEP),
    "w = 1, floor 2 capped": library_rule(loss_gap_floor=2.0, loss_gap_floor_share=1 - KEEP, copy_loss_weight=1.0),
    "floor 2 capped at 0.3": library_rule(loss_gap_floor=2.0, loss_gap_floor_share=0.3),
    "w = 1, no floor": library_rule(copy_loss_weight=1.0),
    "w = 2, no floor": library_rule(copy_loss_weight=2.0),
    "w = 3, no floor": library_rule(copy_loss_weight=3.0),
}


def first_of_runs(noise):
    before = torch.zeros_like(noise)
    before[:, 1:] = noise[:, :-1]
    return noise & ~before


def score_rules(pattern: str, rules: dict, drop_over: str = "scored", keep: float = KEEP):
    """({(world, stage, rule): [AUROC per seed]}, {(world, stage, rule): tally}) over the dumps `pattern` names: the
    AUROC of −value for noise per batch (on the scored tokens, as detect.py does), mean over a file's batches; the
    tally sums over batches [noise dropped, noise, first tokens of runs dropped, first tokens, clean dropped, clean]
    at `keep`, the lowest 1 − keep of the `drop_over` tokens ("scored", or "response": the library's budget)
    dropped."""
    aurocs = collections.defaultdict(list)
    drops = collections.defaultdict(lambda: [0] * 6)
    for world, stage, batches in read_dumps(pattern):
        per_rule = collections.defaultdict(list)
        for batch in batches:
            resp, scored, noise, parts = batch["response"], batch["scored"], batch["noise"], batch["parts"]
            first = first_of_runs(batch["record"]["noise"]) & scored
            pool = scored if drop_over == "scored" else resp
            for name, rule in rules.items():
                value = torch.zeros(resp.shape, dtype=torch.float64)
                value[resp] = rule(parts).double()
                per_rule[name].append(auroc(-value[scored], noise[scored]))
                n_drop = int((1 - keep) * int(pool.sum()))
                dropped = torch.zeros_like(pool)
                if n_drop:
                    cut = torch.sort(value[pool]).values[n_drop - 1]
                    dropped = pool & (value <= cut)
                tally = drops[(world, stage, name)]
                for i, x in enumerate(((dropped & noise).sum(), noise.sum(), (dropped & first).sum(), first.sum(),
                                       (dropped & scored & ~noise).sum(), (scored & ~noise).sum())):
                    tally[i] += int(x)
        for name, values in per_rule.items():
            aurocs[(world, stage, name)].append(statistics.mean(values))
    return aurocs, drops


def columns_of(aurocs) -> list:
    """The (world, stage) columns of `score_rules`' AUROCs, each world's θ₀ before its SFT."""
    return sorted({(w, s) for w, s, _ in aurocs}, key=lambda c: (c[0], c[1] != "theta0"))


def print_aurocs(aurocs, rules, columns, head: str) -> None:
    n_seeds = len(aurocs[columns[0] + (next(iter(rules)),)])
    print(f"AUROC of −value for noise, mean over seeds ({n_seeds} in the first column)")
    print(f"| rule | {head} | mean |\n" + "|---" * (len(columns) + 2) + "|")
    for name in rules:
        values = [statistics.mean(aurocs[c + (name,)]) for c in columns]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {statistics.mean(values):.3f} |")


def print_drops(drops, rules, columns, head: str, keep: float = KEEP) -> None:
    print(f"\nDropped at keep {keep}: noise / first tokens of noise runs / clean (shares of each)")
    print(f"| rule | {head} |\n" + "|---" * (len(columns) + 1) + "|")
    for name in rules:
        cells = []
        for c in columns:
            t = drops[c + (name,)]
            cells.append(f"{t[0] / t[1]:.2f} / {t[2] / max(t[3], 1):.2f} / {t[4] / t[5]:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(pattern: str):
    aurocs, drops = score_rules(pattern, RULES)
    columns = columns_of(aurocs)
    head = " | ".join(f"{w.split('-', 1)[1]} {'θ₀' if s == 'theta0' else 'SFT'}" for w, s in columns)
    print_aurocs(aurocs, RULES, columns, head)
    print_drops(drops, RULES, columns, head)


if __name__ == "__main__":
    main(sys.argv[1])
