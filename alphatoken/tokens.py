"""Per-token quantities from logits: the one place log-softmax, gather and entropy are written (DESIGN §2.1).

`logits` are (B, T, V) with the HF convention (row t − 1 predicts labels[:, t]); `rows` are (n, V) logit rows
already picked. The (B, T) functions return float32, 0 outside the response.
"""
from __future__ import annotations

import torch

from .batch import model_inputs, response_mask


def accurate(x: torch.Tensor) -> torch.Tensor:
    """float32 for half types and float32; float64 stays float64 (exact checks)."""
    return x if x.dtype == torch.float64 else x.float()


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gather(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """rows[i, targets[i]] for every i: (n, V), (n,) -> (n,)."""
    return rows.gather(1, targets.unsqueeze(1)).squeeze(1)


def log_probs(rows: torch.Tensor, keep_float64: bool = True) -> torch.Tensor:
    """log-softmax of logit rows (n, V), in float32 (float64 stays float64 unless keep_float64=False)."""
    return torch.log_softmax(accurate(rows) if keep_float64 else rows.float(), dim=-1)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's distribution from its log-probs (n, V) -> (n,)."""
    return -(logp.exp() * logp).sum(-1)


def error_norm(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """‖p − e_y‖ of each row from its log-probs (n, V) and targets (n,): sqrt(‖p‖² − 2 p_y + 1)."""
    p = logp.exp()
    return (p.square().sum(-1) - 2 * gather(p, targets) + 1).clamp(min=0).sqrt()


def nll_with_graph(rows: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs (n, V), NLL (n,)) of the targets from their logit rows (n, V), in the graph
    (also when the caller is under torch.no_grad: the valuation backward needs it)."""
    with torch.enable_grad():
        logp = log_probs(rows)
        return logp, -gather(logp, targets)


def _per_response_token(logits: torch.Tensor, labels: torch.Tensor, fn) -> torch.Tensor:
    """(B, T) float32 holding fn(log-probs of the predicting rows, targets) at the response tokens, 0 elsewhere."""
    labels = labels.to(logits.device)
    resp = response_mask(labels)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    if resp.any():
        b, t = resp.nonzero(as_tuple=True)
        out[b, t] = fn(log_probs(logits[b, t - 1], keep_float64=False), labels[b, t])
    return out


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) float32: log p(labels[b, t]) from logits[b, t - 1]; 0 outside the response."""
    return _per_response_token(logits, labels, gather)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) float32: ℓ_t = −log p(labels[:, t]) from logits[:, t−1]; 0 outside the response."""
    return _per_response_token(logits, labels, lambda logp, y: -gather(logp, y))


def token_entropies(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) float32: entropy of the predictive distribution at t−1 for response positions t; 0 elsewhere."""
    return _per_response_token(logits, labels, lambda logp, y: entropy(logp))


def token_error_norms(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) float32: ‖p_θ(· | y_<t) − e_{y_t}‖ from logits[:, t−1] (EL2N per token); 0 outside the response."""
    return _per_response_token(logits, labels, error_norm)


def reference_logprobs(model, batch: dict) -> torch.Tensor:
    """(B, T) float32 log-probabilities of `batch`'s labels under `model`, without gradients (DPO's reference)."""
    with torch.no_grad():
        logits = model(**model_inputs(model, batch)).logits
        return token_logprobs(logits, batch["labels"])
