"""Round 19 analysis aid: how far can the parts the library computes go at θ₀, against the strongest scorers?

Reads `../out_r12/dump_parts.py` files and prints, per world and stage:

* the AUROC of single scorers (the copy's loss, the oracle copy's loss, −ℓ, GraNd per token −|C_t| as detect.py's
  `grad_norm_low`), the defaults, the copy's loss fused without the floor, and a label-free ensemble that weighs
  each part by its agreement with the others in the batch (`agreement_weighted`, spectral-meta-learner style);
* a reference ceiling: a logistic regression (linear in the parts), fitted on the noise labels of the other seeds
  of the same world and stage and scored on the held-out seed (leave one seed out), which a label-free rule built
  from the same parts is not expected to pass (a non-linear fit could go further; not tried);
  first on the per-batch ranks of the first-order value A and the copy's loss (what the defaults fuse), then adding
  |C_t|, then on every part (ranks and nats).

    python benchmarks/quality/out_r12/dump_parts.py --worlds toy-add,toy-copy,toy-reverse,toy-sort \
        --seeds 0 1 2 3 4 --out DIR
    python benchmarks/quality/out_r12/dump_parts.py --worlds real-capitals,real-reverse --seeds 0 1 --out DIR
    python benchmarks/quality/out_r19/theta0_ceiling.py DIR
"""
import glob
import statistics
import sys
from pathlib import Path

import torch

QUAL = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(QUAL))
from alphatoken.combine import percentile_rank  # noqa: E402
from detect import auroc  # noqa: E402
from out_r12.dump_parts import library_rule, read_dumps  # noqa: E402
from out_r16.floor_share import columns_of, copy_loss, oracle_copy_loss, print_aurocs, score_rules  # noqa: E402

DEFAULTS = library_rule(loss_gap_floor=2.0, loss_gap_floor_share=0.2, copy_loss_order_weight=1.0)
FIRST_ORDER = library_rule()  # the ranked first-order value alone (the cosine rule, no floor, no copy's loss)


def agreement_weighted(parts_of):
    """Rank fusion with label-free weights: for conditionally independent detectors the covariance of their ranks
    is rank one off the diagonal, C_ij = v_i v_j with v_i growing with detector i's AUROC; v_i² is estimated as the
    mean over pairs (j, l) of C_ij C_il / C_jl, and the ranks are summed with weights v_i (clipped at 0)."""
    def rule(p):
        ranks = torch.stack([percentile_rank(f(p).double()) for f in parts_of], 0)
        ranks = ranks - ranks.mean(1, keepdim=True)
        cov = ranks @ ranks.T / ranks.shape[1]
        k = len(parts_of)
        weight = torch.zeros(k, dtype=torch.float64)
        for i in range(k):
            est = [(cov[i, j] * cov[i, l] / cov[j, l]).clamp(min=0) for j in range(k) for l in range(j + 1, k)
                   if i not in (j, l) and cov[j, l] > 1e-12]
            weight[i] = torch.stack(est).mean().sqrt() if est else 0.0
        return (weight[:, None] * ranks).sum(0)
    return rule


def grad_norm(p):
    return -p["credit_norm_direct"]


RULES = {
    "the copy's loss": copy_loss,
    "the oracle copy's loss": oracle_copy_loss,
    "−ℓ": lambda p: -p["loss"],
    "GraNd per token (−|C_t|)": grad_norm,
    "defaults": DEFAULTS,
    "copy's loss fused at w = 1, no floor": library_rule(copy_loss_weight=1.0),
    "agreement-weighted: A, copy's loss, |C_t|, gap": agreement_weighted(
        [FIRST_ORDER, copy_loss, grad_norm, lambda p: p["loss_gap"]]),
}


FEATURES = {  # per-token features of one batch's parts: per-batch ranks, then nats
    "rank A": lambda p: percentile_rank(p["adaptation_direct"].double()),
    "rank copy's loss": lambda p: percentile_rank(-p["copy_loss"].double()),
    "rank |C_t|": lambda p: percentile_rank(-p["credit_norm_direct"].double()),
    "rank causal A": lambda p: percentile_rank(p["adaptation_causal"].double()),
    "rank −ℓ": lambda p: percentile_rank(-p["loss"].double()),
    "rank gap": lambda p: percentile_rank(p["loss_gap"].double()),
    "copy's loss": lambda p: -p["copy_loss"].double(),
    "−ℓ": lambda p: -p["loss"].double(),
    "gap": lambda p: p["loss_gap"].double(),
    "A / |C_t|": lambda p: p["adaptation_direct"].double() / (p["credit_norm_direct"].double() + 1e-12),
}


def features(p) -> torch.Tensor:
    """(n, len(FEATURES)) features of one batch's parts, columns in FEATURES' order."""
    return torch.stack([f(p) for f in FEATURES.values()], 1)


FITS = {"fit: ranks of A, copy's loss": ["rank A", "rank copy's loss"],
        "fit: ranks of A, copy's loss, |C_t|": ["rank A", "rank copy's loss", "rank |C_t|"],
        "fit: every part": None}


def scored_batches(path):
    """[(features on the scored tokens, noise flags)] of one dump file."""
    out = []
    for _, _, batches in read_dumps(path):
        for b in batches:
            x = features(b["parts"])
            full = torch.zeros(b["response"].shape + (x.shape[1],), dtype=torch.float64)
            full[b["response"]] = x
            out.append((full[b["scored"]], b["noise"][b["scored"]]))
    return out


def fit_logistic(train, cols):
    """A scorer x -> logit, L2-regularised logistic regression on the standardised columns `cols`."""
    x = torch.cat([f[:, cols] for f, _ in train])
    y = torch.cat([n for _, n in train]).double()
    mean, std = x.mean(0), x.std(0) + 1e-9
    design = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    w = torch.zeros(design.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(design @ w, y) + 1e-4 * w.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    w = w.detach()
    return lambda f: torch.cat([(f[:, cols] - mean) / std, torch.ones(len(f), 1, dtype=torch.float64)], 1) @ w


def fitted_ceiling(root: str, columns):
    """{(world, stage, fit): [held-out AUROC per seed]}: leave one seed out within each world and stage."""
    names = list(FEATURES)
    out = {}
    for world, stage in columns:
        per_seed = {path: scored_batches(path) for path in sorted(glob.glob(f"{root}/{world}_s*_{stage}.pt"))}
        for fit, chosen in FITS.items():
            cols = list(range(len(names))) if chosen is None else [names.index(c) for c in chosen]
            held_out = []
            for path, test in per_seed.items():
                model = fit_logistic([b for other, bs in per_seed.items() if other != path for b in bs], cols)
                held_out.append(statistics.mean(auroc(model(f), n) for f, n in test))
            out[(world, stage, fit)] = held_out
    return out


def main(root: str):
    aurocs, _ = score_rules(f"{root}/*.pt", RULES)
    columns = columns_of(aurocs)
    aurocs.update(fitted_ceiling(root, columns))
    head = " | ".join(f"{w.split('-', 1)[0]} {w.split('-', 1)[1]} {'θ₀' if s == 'theta0' else 'SFT'}"
                      for w, s in columns)
    print_aurocs(aurocs, {**RULES, **FITS}, columns, head)


if __name__ == "__main__":
    main(sys.argv[1])
