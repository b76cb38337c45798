"""TRL's usual training metrics, computed over the KEPT tokens, for the trainers whose loss AlphaToken replaces.

TRL's SFTTrainer logs `entropy` and `mean_token_accuracy` over the tokens its loss trains on (labels ≠ -100);
its DPOTrainer logs `rewards/{chosen,rejected,margins,accuracies}`, `logps/{chosen,rejected}`, `logits/{chosen,
rejected}`, `entropy` and `mean_token_accuracy` over the completion tokens its loss sums. With AlphaToken the loss
trains on the kept tokens, so the same names carry the same quantities over the kept tokens: with keep_ratio=1.0
they equal TRL's own figures. For a token y_t predicted from logits z (position t − 1), p = softmax(z):

    entropy           = mean over kept t of −Σ_v p_v log p_v
    mean_token_accuracy = share of kept t with argmax_v z_v = y_t   (DPO: over the chosen rows, as TRL)
    logits/<side>     = mean over kept t of the side of (1/V) Σ_v z_v

Every figure is a ratio of sums taken over all ranks (one all-reduce), like TRL's gathered metrics.
"""
from __future__ import annotations

import torch

from ..distributed import all_reduce_sum
from ..batch import response_mask
from ..tokens import entropy, log_probs


def _kept_rows(logits: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor):
    """(n, V) float32 logits predicting the kept tokens, and those tokens (n,)."""
    b, t = keep.nonzero(as_tuple=True)
    return logits.detach()[b, t - 1].float(), labels[b, t]


def token_sums(logits: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(4,) float64 local sums over the kept tokens: [Σ entropy, Σ top-1 hits, Σ mean logit, count]."""
    keep = keep.to(logits.device) & response_mask(labels.to(logits.device))
    if not bool(keep.any()):
        return torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        return row_sums([_kept_rows(logits, keep, labels.to(logits.device))])


def row_sums(chunks) -> torch.Tensor:
    """The same (4,) sums as `token_sums`, from (logit rows, targets) chunks of the kept tokens (the fused head's
    `AlphaToken.kept_logit_chunks`)."""
    total = torch.zeros(4, dtype=torch.float64)
    for z, y in chunks:
        total += torch.stack([entropy(log_probs(z)).double().sum(), (z.argmax(-1) == y).double().sum(),
                              z.double().mean(-1).sum(), torch.tensor(float(y.numel()), dtype=torch.float64,
                                                                      device=z.device)]).cpu()
    return total


def sft_metrics_from_sums(sums: torch.Tensor) -> dict:
    ent, hits, _, n = all_reduce_sum(sums).tolist()
    return {"entropy": ent / n if n else 0.0, "mean_token_accuracy": hits / n if n else 0.0}


def sft_metrics(logits: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor) -> dict:
    """`entropy` and `mean_token_accuracy` over the kept tokens of all ranks (TRL's SFTTrainer names)."""
    ent, hits, _, n = all_reduce_sum(token_sums(logits, keep, labels)).tolist()
    return {"entropy": ent / n if n else 0.0, "mean_token_accuracy": hits / n if n else 0.0}


def dpo_metrics(logits: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor, out, beta: float,
                all_tokens=None) -> dict:
    """TRL's DPOTrainer metrics over the kept tokens of a (2B, T) batch, chosen rows first.

    `out` is the `alphatoken.dpo.DPOOutput` of the masked loss (its log-ratio and log-prob sums are over the kept
    tokens). `all_tokens`, a DPOOutput over every response token, adds `alphatoken/all_tokens/rewards/*` and
    `alphatoken/all_tokens/logps/*`: the figures a plain DPO run would log, for comparison.
    """
    B = keep.shape[0] // 2
    chosen_sums = token_sums(logits[:B], keep[:B], labels[:B])
    rejected_sums = token_sums(logits[B:], keep[B:], labels[B:])
    ent_c, hits_c, mean_c, n_c = all_reduce_sum(chosen_sums).tolist()
    ent_r, _, mean_r, n_r = all_reduce_sum(rejected_sums).tolist()
    n = n_c + n_r
    metrics = {
        "entropy": (ent_c + ent_r) / n if n else 0.0,
        "mean_token_accuracy": hits_c / n_c if n_c else 0.0,
        "logits/chosen": mean_c / n_c if n_c else 0.0,
        "logits/rejected": mean_r / n_r if n_r else 0.0,
    }
    metrics.update(reward_metrics(out, beta, ""))
    if all_tokens is not None:
        metrics.update(reward_metrics(all_tokens, beta, "alphatoken/all_tokens/"))
    return metrics


def reward_metrics(out, beta: float, prefix: str) -> dict:
    """rewards/* and logps/* as TRL computes them (β · log-ratio sums, means over the pairs of all ranks)."""
    chosen = beta * out.chosen_logratios.detach().double()
    rejected = beta * out.rejected_logratios.detach().double()
    sums = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).double().sum(),
                        out.chosen_logps.detach().double().sum(), out.rejected_logps.detach().double().sum(),
                        torch.tensor(float(chosen.numel()), dtype=torch.float64, device=chosen.device)]).cpu()
    c, r, acc, lc, lr, pairs = all_reduce_sum(sums).tolist()
    pairs = max(pairs, 1.0)
    return {f"{prefix}rewards/chosen": c / pairs, f"{prefix}rewards/rejected": r / pairs,
            f"{prefix}rewards/accuracies": acc / pairs, f"{prefix}rewards/margins": (c - r) / pairs,
            f"{prefix}logps/chosen": lc / pairs, f"{prefix}logps/rejected": lr / pairs}
