"""Baseline token scorers with AlphaToken's API, so selection methods can be compared on the same data.

Each scorer gives every response token a score in `TokenValues.total` and keeps the top `keep_ratio` with
`alphatoken.select.select_tokens` (same selection, ties and `min_keep_per_sequence` as AlphaToken):

| name            | score (higher is kept)                          | keeps                                      |
|-----------------|-------------------------------------------------|--------------------------------------------|
| `random`        | U(0, 1) from a seeded generator                 | a random subset                            |
| `loss_low`      | −ℓ_t                                            | the lowest-loss (easiest) tokens            |
| `loss_high`     | ℓ_t                                             | the highest-loss (hardest) tokens           |
| `entropy`       | H(p_θ(· | y_<t))                                | the most uncertain positions                |
| `excess_loss`   | ℓ_t(θ) − ℓ_t(reference)  (Rho-1)                | tokens the model finds harder than the ref  |
| `grad_norm_low` | −‖∇_{W_head} ℓ_t‖ = −‖p_t − e_{y_t}‖·‖h_t‖      | the smallest own head gradients (GraNd)     |

ℓ_t = −log p_θ(y_t | y_<t), read from the logits at t−1 (HF causal-LM convention). `excess_loss` (alias `rho1`)
compares with a reference model: by default a frozen snapshot of the model taken at construction (θ₀, the
pre-trained model), as AlphaToken's reference. The score is stored in `total`, `adaptation` and `direct`;
`stability` and `causal` are 0, so `total = adaptation + λ·stability = direct + γ·causal` holds.
`grad_norm_low` is GraNd per token at the output head: p_t the model's distribution at the predicting position,
e_{y_t} the label's one-hot, h_t the head's input there (the head credit of DESIGN §2.3, AlphaToken's `|C_t|`); it
reads h_t from a forward pre-hook on the output embedding held for the forward only.

    with make_scorer("excess_loss", model, AlphaTokenConfig(keep_ratio=0.6)) as scorer:
        loss = scorer.value_and_loss(batch)      # masked mean CE over the kept tokens
        loss.backward()
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

from .config import AlphaTokenConfig
from .batch import model_inputs, response_mask, unwrap_model
from .layers import find_head
from .losses import masked_causal_lm_loss
from .tokens import token_entropies, token_error_norms, token_losses
from .values import TokenValues

def _model_inputs(model, batch: dict) -> dict:
    """The forward arguments of `model` for `batch` (`alphatoken.batch.model_inputs`: left-padded batches get their
    position_ids from the attention mask, as in AlphaToken), on the model's device."""
    if "input_ids" not in batch or "labels" not in batch:
        raise ValueError("a batch needs 'input_ids' and 'labels' (-100 outside the response); "
                         f"got keys {sorted(batch)}")
    device = _device(model)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model_inputs(model, batch).items()}


def _device(model) -> torch.device:
    return next(model.parameters()).device


class Scorer:
    """Base class: subclasses implement `score(logits, batch) -> (B, T) float` (response positions matter)."""

    name = "scorer"

    def __init__(self, model, cfg: Optional[AlphaTokenConfig] = None):
        self.model = model
        self.cfg = cfg if cfg is not None else AlphaTokenConfig()
        self.last_values: Optional[TokenValues] = None

    # --- subclass hook
    def score(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    # --- AlphaToken-compatible API
    def _values(self, logits: torch.Tensor, batch: dict) -> TokenValues:
        from .select import protected_tokens, select_tokens

        labels = batch["labels"].to(logits.device)
        response = response_mask(labels)
        with torch.no_grad():
            total = self.score(logits.detach(), {**batch, "labels": labels}).float()
        total = torch.where(response, total, torch.zeros_like(total))
        if self.cfg.check_finite and not bool(torch.isfinite(total[response]).all()):
            raise FloatingPointError(f"{type(self).__name__} produced non-finite scores; check the model's logits")
        mask = select_tokens(total, response, self.cfg, protected_tokens(labels, response, self.cfg)) & response
        zeros = torch.zeros_like(total)
        tv = TokenValues(adaptation=total, stability=zeros, direct=total.clone(), causal=zeros.clone(),
                         total=total.clone(), mask=mask, response=response)
        self.last_values = tv
        return tv

    def _forward(self, batch: dict) -> torch.Tensor:
        """The model's logits for `batch` (subclasses may capture more of the same forward)."""
        return self.model(**_model_inputs(self.model, batch)).logits

    def value(self, batch: dict) -> TokenValues:
        """Score the batch's response tokens and select (one forward, no gradients)."""
        with torch.no_grad():
            logits = self._forward(batch)
        return self._values(logits, batch)

    def value_and_loss(self, batch: dict) -> torch.Tensor:
        """One forward: the values (in `last_values`) and the masked mean CE over kept tokens, to backpropagate."""
        logits = self._forward(batch)
        tv = self._values(logits, batch)
        loss = masked_causal_lm_loss(logits, tv.apply(batch["labels"].to(logits.device)))
        if self.cfg.check_finite and not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"{type(self).__name__}: the masked loss is not finite")
        return loss

    def tracked_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def close(self) -> None:
        """Nothing to remove (scorers install no hooks); kept for API parity with AlphaToken."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RandomScorer(Scorer):
    """Uniform random scores from a generator seeded with `seed` (reproducible masks)."""

    name = "random"

    def __init__(self, model, cfg: Optional[AlphaTokenConfig] = None, seed: int = 0):
        super().__init__(model, cfg)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def score(self, logits, batch):
        return torch.rand(batch["labels"].shape, generator=self.generator).to(logits.device)


class LossScorer(Scorer):
    """Per-token loss: mode "low" keeps the lowest-loss tokens (score −ℓ), "high" the highest (score ℓ)."""

    def __init__(self, model, cfg: Optional[AlphaTokenConfig] = None, mode: str = "low"):
        if mode not in ("low", "high"):
            raise ValueError(f"LossScorer mode must be 'low' or 'high', got {mode!r}")
        super().__init__(model, cfg)
        self.mode = mode
        self.name = f"loss_{mode}"

    def score(self, logits, batch):
        loss = token_losses(logits, batch["labels"])
        return -loss if self.mode == "low" else loss


class EntropyScorer(Scorer):
    """Predictive entropy at the position that predicts the token; keeps the most uncertain positions."""

    name = "entropy"

    def score(self, logits, batch):
        return token_entropies(logits, batch["labels"])


class ExcessLossScorer(Scorer):
    """Rho-1 excess loss ℓ_t(θ) − ℓ_t(reference); reference defaults to a frozen snapshot of `model` now (θ₀)."""

    name = "excess_loss"

    def __init__(self, model, cfg: Optional[AlphaTokenConfig] = None, reference=None):
        super().__init__(model, cfg)
        if reference is None:
            reference = copy.deepcopy(model)
        self.reference = reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)

    def score(self, logits, batch):
        labels = batch["labels"]
        with torch.no_grad():
            ref_logits = self.reference(**_model_inputs(self.reference, batch)).logits.to(logits.device)
        return token_losses(logits, labels) - token_losses(ref_logits, labels)

    def close(self) -> None:
        self.reference = None


def logits_and_head_input(model, head: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward `model(**inputs)`: (its logits, the input of its output head `head`, (B, T, d), detached), the
    latter read by a forward pre-hook held for this forward only."""
    seen = {}
    handle = head.register_forward_pre_hook(lambda module, args: seen.__setitem__("h", args[0].detach()))
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    return logits, seen.get("h")


def predicting_feature_norms(head_input: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, T) ‖h_{t−1}‖ in `dtype`: the norm of the head's input at the row that predicts token t (0 at t = 0)."""
    norms = torch.zeros(head_input.shape[:2], dtype=dtype, device=head_input.device)
    norms[:, 1:] = head_input[:, :-1].to(dtype).norm(dim=-1)
    return norms


class GradNormScorer(Scorer):
    """GraNd per token at the output head: score −‖∇_{W_head} ℓ_t‖ = −‖p_t − e_{y_t}‖·‖h_t‖, keeps the tokens whose
    own head gradient is smallest. ℓ_t is predicted at position t−1, so p_t and h_t are read there."""

    name = "grad_norm_low"

    def __init__(self, model, cfg: Optional[AlphaTokenConfig] = None):
        super().__init__(model, cfg)
        _, self.head = find_head(unwrap_model(model))  # the valuer's head (§2.2), inside any DDP / compile wrapper
        self._head_input: Optional[torch.Tensor] = None

    def _forward(self, batch):
        logits, self._head_input = logits_and_head_input(self.model, self.head, _model_inputs(self.model, batch))
        return logits

    def score(self, logits, batch):
        labels = batch["labels"]
        h = self._head_input
        self._head_input = None
        if h is None or h.shape[:2] != labels.shape:
            raise ValueError("grad_norm_low: the head's input was not captured for every position of the batch "
                             f"(got {None if h is None else tuple(h.shape)} for labels {tuple(labels.shape)})")
        feature_norm = predicting_feature_norms(h).to(logits.device)  # h at t−1 predicts token t
        return -(token_error_norms(logits, labels) * feature_norm)  # 0 outside the response


SCORERS = {
    "random": lambda model, cfg, reference=None, seed=0: RandomScorer(model, cfg, seed=seed),
    "loss_low": lambda model, cfg, reference=None, seed=0: LossScorer(model, cfg, mode="low"),
    "loss_high": lambda model, cfg, reference=None, seed=0: LossScorer(model, cfg, mode="high"),
    "entropy": lambda model, cfg, reference=None, seed=0: EntropyScorer(model, cfg),
    "excess_loss": lambda model, cfg, reference=None, seed=0: ExcessLossScorer(model, cfg, reference=reference),
    "grad_norm_low": lambda model, cfg, reference=None, seed=0: GradNormScorer(model, cfg),
}
ALIASES = {"rho1": "excess_loss", "rho-1": "excess_loss", "loss": "loss_low", "high_entropy": "entropy",
           "grand": "grad_norm_low"}


def make_scorer(name: str, model, cfg: Optional[AlphaTokenConfig] = None, reference=None, seed: int = 0) -> Scorer:
    """A scorer by name: random, loss_low, loss_high, entropy, excess_loss (alias rho1), grad_norm_low (alias grand).

    reference: the model for excess_loss (default: a frozen copy of `model` taken now); seed: for random.
    """
    key = ALIASES.get(name, name)
    if key not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose one of {sorted(SCORERS)} (or alias {sorted(ALIASES)})")
    return SCORERS[key](model, cfg, reference=reference, seed=seed)


__all__ = ["Scorer", "RandomScorer", "LossScorer", "EntropyScorer", "ExcessLossScorer", "GradNormScorer", "SCORERS",
           "make_scorer", "token_losses", "token_entropies", "logits_and_head_input", "predicting_feature_norms"]
