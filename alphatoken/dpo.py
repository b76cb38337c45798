"""DPO with token masks (DESIGN §4): masked log-ratio sums, and values from the DPO loss's own credits.

Batch layout (TRL's concatenated forward): `2B` rows, the `B` chosen responses first, then the `B` rejected ones in
the same pair order. Everything per token is `(2B, T)` aligned with `labels` (HF convention: position `t` holds the
log-probability of `labels[:, t]` read from the logits at `t - 1`; 0 outside the response).

For pair `b` with log-ratios `r_t = log π(y_t) − log π_ref(y_t)`:

    h_b  = Σ_{t ∈ kept(chosen_b)} r_t − Σ_{t ∈ kept(rejected_b)} r_t
    loss = (1/B) Σ_b −log σ(β h_b)

The values come from the credits of this same loss: with ℓ_t = −log π(y_t), `∂loss/∂ℓ_t = (β/B) σ(−β h_b)` on chosen
tokens and `−(β/B) σ(−β h_b)` on rejected ones (`h_b` over all response tokens, since the mask does not exist yet).
Passing these as `token_weights` to the engine makes the valued loss Σ_t w_t ℓ_t, whose gradient is the DPO
loss's gradient, so adaptation and stability are those of the DPO step itself.

    from alphatoken.dpo import dpo_value_and_loss
    loss = dpo_value_and_loss(valuer, batch, ref_token_logps, beta=0.1)   # batch: input_ids, attention_mask, labels
    loss.backward()
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .batch import IGNORE_INDEX, response_mask
from .tokens import token_logprobs

__all__ = [
    "check_beta",
    "check_pairs",
    "completion_labels",
    "dpo_token_weights",
    "masked_dpo_loss",
    "DPOMaskedLoss",
    "dpo_value_and_loss",
    "DPOOutput",
    "token_logprobs",
]


def check_beta(beta, where: str = "beta") -> float:
    """`beta` as a float, or ValueError: DPO's β must be a finite number > 0.

    β ≤ 0 flips or flattens the preference (−log σ(β h) then rewards the rejected response, or is constant), NaN
    makes every loss NaN, and a bool is almost always a mistake for a number; all are refused here, where β enters.
    """
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise ValueError(f"{where} must be a number > 0 (DPO's β, e.g. 0.1), got {beta!r}")
    value = float(beta)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where} must be a finite number > 0 (DPO's β, e.g. 0.1), got {beta!r} (β <= 0 rewards "
                         "the rejected response or ignores the preference; NaN or inf make the loss non-finite)")
    return value


def completion_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """TRL's DPO labels: `input_ids` with every non-completion position set to -100."""
    return input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)


def check_pairs(labels: torch.Tensor, indices: Optional[Sequence[int]] = None, where: str = "batch") -> None:
    """Raise ValueError naming the pair whose chosen or rejected side has no response token.

    `labels` is (2B, T) with chosen rows first; `indices` (optional, length B) are the pairs' dataset indices.
    """
    if labels.dim() != 2 or labels.shape[0] % 2:
        raise ValueError(
            f"a DPO batch needs (2B, T) labels, chosen rows first then rejected; got shape {tuple(labels.shape)}"
        )
    n = response_mask(labels).sum(dim=1)
    B = labels.shape[0] // 2
    for side, counts in (("chosen", n[:B]), ("rejected", n[B:])):
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            b = empty[0]
            name = f"example {indices[b]}" if indices is not None else f"pair {b} of the {where}"
            raise ValueError(
                f"{name}: the {side} response has no token to train on (empty, or truncated away by max_length); "
                "drop the pair or raise max_length"
            )


def _pair_sums(per_token: torch.Tensor, keep: torch.Tensor):
    sums = (per_token * keep).sum(dim=1)
    B = sums.shape[0] // 2
    return sums[:B], sums[B:]


def dpo_token_weights(
    ref_token_logps: torch.Tensor, beta: float, response: Optional[torch.Tensor] = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The `token_weights` callable for the engine: the DPO loss's credit `∂loss/∂ℓ_t` of every response token.

    Args:
        ref_token_logps: (2B, T) reference log-probabilities aligned with labels, 0 outside the response.
        beta: DPO β.
        response: (2B, T) bool, the response tokens (default: where the policy log-probs are non-zero).
    Returns:
        callable(token_logprobs (2B, T) detached float32) -> (2B, T) weights: (β/B)σ(−βh_b) on chosen tokens,
        −(β/B)σ(−βh_b) on rejected tokens, 0 elsewhere.
    """
    beta = check_beta(beta)
    ref = ref_token_logps.detach().float()

    def weights(policy_token_logps: torch.Tensor) -> torch.Tensor:
        pol = policy_token_logps.detach().float()
        resp = response.to(pol.device) if response is not None else pol != 0
        resp = resp.to(pol.dtype)
        c, r = _pair_sums(pol - ref.to(pol.device), resp)
        B = c.shape[0]
        w = (beta / B) * torch.sigmoid(-beta * (c - r))  # (B,)
        row = torch.cat([w, -w]).unsqueeze(1)
        return row * resp

    return weights


@dataclass
class DPOOutput:
    loss: torch.Tensor
    chosen_logratios: torch.Tensor  # (B,) Σ over kept chosen tokens of r_t
    rejected_logratios: torch.Tensor  # (B,)
    chosen_logps: torch.Tensor  # (B,) Σ over kept chosen tokens of log π
    rejected_logps: torch.Tensor


def masked_dpo_loss(
    policy_token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    keep: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """The sigmoid DPO loss with log-ratios summed over kept tokens only (DESIGN §4).

    All inputs (2B, T) aligned with labels; `keep` bool (kept response tokens). Returns the mean over pairs, as TRL.
    `label_smoothing` is cDPO's ε: (1−ε)·(−log σ(βh)) + ε·(−log σ(−βh)).
    """
    beta = check_beta(beta)
    if not (policy_token_logps.shape == ref_token_logps.shape == keep.shape):
        raise ValueError(
            f"policy {tuple(policy_token_logps.shape)}, reference {tuple(ref_token_logps.shape)} and keep "
            f"{tuple(keep.shape)} must all be the same (2B, T)"
        )
    k = keep.to(policy_token_logps.dtype)
    pc, pr = _pair_sums(policy_token_logps, k)
    rc, rr = _pair_sums(ref_token_logps.to(policy_token_logps), k)
    chosen, rejected = pc - rc, pr - rr
    logits = beta * (chosen - rejected)
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return DPOOutput(loss.mean(), chosen, rejected, pc, pr)


class DPOMaskedLoss:
    """`loss_fn(logits, masked_labels)` for `AlphaToken.value_and_loss`: the masked DPO loss.

    The kept tokens are those whose masked label is not -100. `output` returns the whole `DPOOutput` (pass it as
    the loss_fn of `AlphaToken.step`, whose result then carries it); the last one is also kept in `.last`.
    """

    def __init__(self, ref_token_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0):
        self.ref = ref_token_logps
        self.beta = check_beta(beta)
        self.label_smoothing = label_smoothing
        self.last: Optional[DPOOutput] = None

    def output(self, logits: torch.Tensor, masked_labels: torch.Tensor, num_items_in_batch=None) -> DPOOutput:
        keep = response_mask(masked_labels.to(logits.device))
        policy = token_logprobs(logits, masked_labels.to(logits.device))
        self.last = masked_dpo_loss(policy, self.ref.to(policy.device), keep, self.beta, self.label_smoothing)
        return self.last

    def __call__(self, logits: torch.Tensor, masked_labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        return self.output(logits, masked_labels, num_items_in_batch).loss


def dpo_step(
    valuer,
    batch: dict,
    ref_token_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    indices: Optional[Sequence[int]] = None,
    forward_model=None,
):
    """One DPO step's values, mask and masked loss from one forward, as the valuer's `StepResult`.

    Args:
        valuer: an `AlphaToken`.
        batch: `input_ids`, `attention_mask`, `labels` (2B, T), chosen rows first (see `completion_labels`).
        ref_token_logps: (2B, T) reference per-token log-probs aligned with labels (0 outside the response).
        indices: the pairs' dataset indices, for error messages.
        forward_model: run the forward through this module (e.g. the trainer's DDP wrapper of the model).
    Returns the `StepResult`: `loss`, `values`, `logits` (the policy's) and `output` (the `DPOOutput`).
    """
    beta = check_beta(beta)
    labels = batch["labels"]
    check_pairs(labels, indices)
    if ref_token_logps.shape != labels.shape:
        raise ValueError(
            f"ref_token_logps has shape {tuple(ref_token_logps.shape)}, labels {tuple(labels.shape)}; align them "
            "with labels (position t holds log π_ref(labels[:, t]))"
        )
    resp = response_mask(labels)
    ref = ref_token_logps.detach().float() * resp
    loss_fn = DPOMaskedLoss(ref, beta, label_smoothing)
    return valuer.step(batch, loss_fn=loss_fn.output, token_weights=dpo_token_weights(ref, beta, resp),
                       forward_model=forward_model)


def dpo_value_and_loss(
    valuer,
    batch: dict,
    ref_token_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    indices: Optional[Sequence[int]] = None,
):
    """`dpo_step`'s loss alone (`valuer.last_values` holds the TokenValues); `dpo_step` returns the rest."""
    return dpo_step(valuer, batch, ref_token_logps, beta, label_smoothing, indices).loss
