"""AlphaTokenConfig: every knob of the valuation, with its meaning in DESIGN.md terms."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch

SELECTIONS = ("batch", "sequence", "threshold")
PATHS = ("full", "direct")
TARGETS = ("auto", "batch", "validation", "none")
COMBINES = ("linear", "rank")


@dataclass
class AlphaTokenConfig:
    """Configuration of the token valuation and selection (DESIGN §3–§4).

    keep_ratio: share of response tokens kept ("batch" and "sequence" selection).
    selection: "batch" (top of the batch), "sequence" (top of each sequence) or "threshold" (total > threshold).
    stability_weight: λ in total = adaptation + λ·stability.
    causal_weight: γ in adaptation = A(direct) + γ·A(causal), likewise for stability.
    paths: "full" (direct + causal, one valuation backward) or "direct" (head only, no backward).
    target: "auto" (default: "validation" when the valuer is given a validation batch, else "none"), "batch"
        (U = ∇L_mean of this batch), "validation" (of a user batch) or "none" (adaptation = 0). The batch target
        is kept for the exact method, but in benchmarks/quality it ranks injected noise above clean tokens: its
        U is dominated by the noise's own large gradients (DESIGN §3.5).
    lr: η, the virtual step size.
    threshold: the cut for selection="threshold".
    min_keep_per_sequence: every sequence with response tokens keeps at least this many (its best).
    normalize: divide adaptation and stability each by its RMS over the batch's response tokens.
    cosine: divide each path's adaptation by the norm of the token's credit on that path, so the value measures
        how well a step on the token aligns with the target direction U, not how large the step is.
    combine: "linear" (total = adaptation + λ·stability) or "rank" (total = rank(adaptation) + λ·rank(stability),
        percentile ranks over the batch's response tokens; see alphatoken/combine.py).
    leave_one_out: with target="batch", take U without the token's own credit (U − C_t/n), which removes the
        self-influence term η|C_t|²/n that otherwise favours high-loss tokens.
    refresh: with target="validation", recompute the validation direction every `refresh` steps.
    tracked_layers: "all", an int k (the head and the last k transformer blocks) or a regex on module names
        (the head is always tracked).
    track_embeddings: also track the input nn.Embedding.
    reference_device / reference_dtype: where the θ₀ snapshot lives (e.g. "cpu", torch.bfloat16) to save memory.
    global_selection: under torch.distributed, select over the values of all ranks together.
    check_finite: raise on NaN/Inf in the loss or in any layer's values, naming what was non-finite.
    always_keep_token_ids: response tokens with these ids are always kept (e.g. the eos id, so the model
        still learns to stop); they count towards the keep budget like any kept token.
    """

    keep_ratio: float = 0.8
    selection: str = "batch"
    stability_weight: float = 0.5
    causal_weight: float = 1.0
    paths: str = "full"
    target: str = "auto"
    lr: float = 1.0
    threshold: float = 0.0
    min_keep_per_sequence: int = 1
    normalize: bool = False
    cosine: bool = True
    combine: str = "rank"
    leave_one_out: bool = False
    refresh: int = 1
    tracked_layers: Union[str, int] = "all"
    track_embeddings: bool = False
    reference_device: Optional[Union[str, torch.device]] = None
    reference_dtype: Optional[torch.dtype] = None
    global_selection: bool = False
    check_finite: bool = True
    always_keep_token_ids: tuple = ()

    def __post_init__(self) -> None:
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.paths not in PATHS:
            raise ValueError(f"paths must be one of {PATHS}, got {self.paths!r}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {self.combine!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.min_keep_per_sequence < 0:
            raise ValueError(f"min_keep_per_sequence must be >= 0, got {self.min_keep_per_sequence}")
        if self.refresh < 1:
            raise ValueError(f"refresh must be >= 1, got {self.refresh}")
        if isinstance(self.tracked_layers, bool) or not isinstance(self.tracked_layers, (str, int)):
            raise ValueError("tracked_layers must be 'all', an int (last k blocks) or a regex string")
        self.always_keep_token_ids = tuple(int(i) for i in self.always_keep_token_ids)
        if isinstance(self.tracked_layers, int) and self.tracked_layers < 0:
            raise ValueError(f"tracked_layers as a block count must be >= 0, got {self.tracked_layers}")

    def replace(self, **changes) -> "AlphaTokenConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("reference_device", "reference_dtype"):
            if out[key] is not None:
                out[key] = str(out[key])
        return out
