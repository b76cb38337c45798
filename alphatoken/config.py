"""AlphaTokenConfig: every knob of the valuation, with its meaning in DESIGN.md terms."""
from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch

SELECTIONS = ("batch", "sequence", "threshold")
PATHS = ("auto", "full", "direct")
DIRECT_LAYERS = ("auto", "head", "all")
TARGETS = ("auto", "batch", "validation", "tuned", "none")
COMBINES = ("linear", "rank")
LOSS_GAP_FLOOR_ORDERS = ("gap", "value")  # how loss_gap_floor orders the tokens it floors (§3.10)
DEFAULT_LOSS_GAP_FLOOR = 2.0  # τ of loss_gap_floor=None, tuned target under combine="rank" (§3.10; 3.0 in rounds 11–14)
DEFAULT_COPY_LOSS_WEIGHT = 0.0  # w of copy_loss_weight=None with the tuned target under combine="rank" (§3.11)
DEFAULT_COPY_LOSS_ORDER_WEIGHT = 1.0  # w_o of copy_loss_order_weight=None, the same and selection="batch" (§3.12)
DEFAULT_TUNE_LR = 1e-4  # the tuned copy's AdamW rate when tune_lr=None and the run's rate is not known (§3.6)


@dataclass
class AlphaTokenConfig:
    """Configuration of the token valuation and selection (DESIGN §3–§4).

    keep_ratio: share of response tokens kept ("batch" and "sequence" selection).
    selection: "batch" (top of the batch), "sequence" (top of each sequence) or "threshold" (total > threshold).
    stability_weight: λ in total = adaptation + λ·stability; None (default): 0 with the tuned target on every
        layer (the measured recipe, DESIGN §3.5) and 0.5 otherwise.
    causal_weight: γ in adaptation = A(direct) + γ·A(causal), likewise for stability.
    paths: "full" (direct + causal, one valuation backward), "direct" (no causal path, no backward) or "auto"
        (default): "direct" when direct_layers is "all", else "full".
    direct_layers: "head" (the direct path is the head credit, closed form), "all" (the direct adaptation is the
        token's own first-order value over every tracked layer, η⟨∇ℓ_t, U⟩, by one forward-mode pass along U;
        alphatoken/own.py, DESIGN §3.9; targets "validation" and "tuned"; stability and the cosine rule's scale
        stay the head credit's) or "auto" (default): "all" with the tuned target, else "head".
    target: "auto" (default: "tuned" when the valuer is given validation batches, "validation" when it is also
        given a retention batch or its weights are FSDP2-sharded, else "none"), "tuned" (U = θ − θ_val, a copy
        tuned on the validation batches), "batch" (U = ∇L_mean of this batch), "validation" (the gradient of a
        user batch) or "none" (adaptation = 0). The batch target is kept for the exact method, but in
        benchmarks/quality it ranks injected noise above clean tokens: its U is dominated by the noise's own
        large gradients (DESIGN §3.5).
    lr: η, the virtual step size.
    threshold: the cut for selection="threshold".
    min_keep_per_sequence: every sequence with response tokens keeps at least this many (its best).
    normalize: divide adaptation and stability each by its RMS over the batch's response tokens.
    cosine: divide each path's adaptation by the norm of the token's credit on that path, so the value measures
        how well a step on the token aligns with the target direction U, not how large the step is.
    combine: "linear" (total = adaptation + λ·stability) or "rank" (total = rank(adaptation) + λ·rank(stability),
        percentile ranks over the batch's response tokens; see alphatoken/combine.py).
    precondition: measure adaptation in the metric of an Adam-like step on the token, ⟨P ⊙ C, U⟩ with
        P = F^{-1/2} from the kfac reference Fisher, (f_out + δ)^{-1/2} (f_in + δ)^{-1/2}ᵀ, δ = precondition_damping
        × the factor's mean (needs a kfac Fisher; cosine and leave_one_out then use the same metric).
    precondition_damping: δ relative to each Fisher factor's mean.
    leave_one_out: with target="batch", take U without the token's own credit (U − C_t/n), which removes the
        self-influence term η|C_t|²/n that otherwise favours high-loss tokens.
    refresh: with target="validation", recompute the validation direction every `refresh` steps.
    retention_weight: μ, with target="validation" and a retention batch (`AlphaToken(retention=...)`, e.g. the
        base model's own answers from `alphatoken.retention.own_answers`): U = ∇L_val + μ·∇L_ret, so a token whose
        step would undo what the model already says is valued down too (DESIGN §3.8).
    retention_normalize: weigh the retention gradient relative to the validation one, U = ∇L_val +
        μ·(‖∇L_val‖/‖∇L_ret‖)·∇L_ret (norms over all tracked layers, at each refresh), so μ is the retention
        direction's share of U however far training has moved either loss (DESIGN §3.8).
    loss_gap_margin: m in adaptation = min(rank(A), rank(G) + m) with the tuned target, G_t = ℓ_t(θ) − ℓ_t(θ_val)
        the tuned copy's exact loss gap (alphatoken/gap.py, DESIGN §3.10): a token keeps its first-order rank
        unless the exact gap ranks it more than m lower (a filler opening the copy rules out; the defaults of round
        9, replaced by loss_gap_floor in round 11). None (default): off; 1.0 or more: off (ranks lie in (0, 1]).
    loss_gap_floor: τ in nats: with the tuned target's loss gap, a token whose gap G_t < −τ (the tuned copy makes
        it more than τ nats less likely) ranks below every token that is not, in adaptation, the most negative
        gap lowest, so the drop budget goes first to the noise the copy rules out hardest (DESIGN §3.10). None
        (default): DEFAULT_LOSS_GAP_FLOOR (2 nats) with the tuned target and combine="rank", else off; math.inf: off.
    loss_gap_floor_agree: the floor applies only to tokens whose first-order adaptation is negative too (the tuned
        step from here would raise their loss), not to those the model has merely come to predict better than the
        copy, which stays where it was tuned (DESIGN §3.10, round 12). False (default): the gap alone decides.
        True detects better on the toys after SFT, but forgets slightly more on the real reverse task.
    loss_gap_floor_order: how the floored tokens are ordered among themselves (still below every other token):
        "gap" (default): by the gap, the most negative lowest; "value": by the rank each would have without the
        floor (the first-order value, fused with the copy's loss when copy_loss_weight > 0), so a clean token the run
        has come to predict better than the copy is not put below the noise for its gap alone (DESIGN §3.10, round 15).
        "value" detects better on the toys after SFT, but forgets more on the real reverse task at lr 2e-4.
    loss_gap_floor_share: the largest share of the batch's response tokens the floor takes, those with the most
        negative gaps (a token is floored when G_t < −τ and rank(G_t) <= the share). Beyond the drop budget the
        floor's order decides nothing in selection, so the floored tokens past it are ranked by their value like
        every other token instead of below all of them (DESIGN §3.10, round 16). None (default): the drop budget,
        1 − keep_ratio, under selection="batch", else 1.0; 1.0: no cap (rounds 11–15).
    loss_gap_floor_copy_share: the floor also asks the copy's own loss: a token is floored only where
        rank(−ℓ_t(θ_val)) <= this share too, i.e. the copy finds it among the batch's least likely tokens, not
        merely less likely than the run does (a clean token it has made less sure; DESIGN §3.10, round 17).
        None (default): 1.0 (off); e.g. the drop budget, 1 − keep_ratio.
    copy_loss_weight: w in adaptation = (rank(A) + w·rank(−ℓ_t(θ_val))) / (1 + w), before the veto and the floor:
        the tuned copy's own loss on the token (how unlikely a model tuned on the clean validation batches finds
        it), rank-fused with the first-order value; it costs the loss gap's forward (DESIGN §3.11, round 13).
        None (default): DEFAULT_COPY_LOSS_WEIGHT with the tuned target and combine="rank", else 0; 0: off.
    copy_loss_order_weight: w_o, under selection="batch": the tokens in the drop budget (the lowest 1 − keep_ratio
        of the value above) stay there, and the order inside the dropped set and inside the kept set becomes the
        first-order rank fused with the copy's own loss at w_o, (rank(A) + w_o·rank(−ℓ_t(θ_val))) / (1 + w_o). Which
        tokens are dropped does not change (with λ = 0); how well the order separates noise does (DESIGN §3.12,
        round 17). None (default): DEFAULT_COPY_LOSS_ORDER_WEIGHT with the tuned target, combine="rank" and
        selection="batch", else 0; 0: off.
    tune_steps / tune_lr: with target="tuned" (U = θ − θ_val, the displacement from a copy of the model tuned on
        the validation batches; DESIGN §3.6), the AdamW steps and learning rate of that tuning, done once when the
        valuer is built (unless it is given tuned=<the tuned model or state dict>). tune_lr None (default): the
        run's own learning rate, read from `AlphaToken(optimizer=...)` (the trainer integrations and `alphatoken
        train` pass theirs), so the copy is tuned like the run; DEFAULT_TUNE_LR (1e-4), with a warning, when the
        valuer is given no optimizer or one that is not Adam-like. 12 steps at the run's rate (round 14; before:
        32 steps at 1e-4) was level with or ahead of the older copy on real reverse and the toy (§3.6).
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
    stability_weight: Optional[float] = None
    causal_weight: float = 1.0
    paths: str = "auto"
    direct_layers: str = "auto"
    target: str = "auto"
    lr: float = 1.0
    threshold: float = 0.0
    min_keep_per_sequence: int = 1
    normalize: bool = False
    cosine: bool = True
    combine: str = "rank"
    precondition: bool = False
    precondition_damping: float = 0.1
    leave_one_out: bool = False
    refresh: int = 1
    retention_weight: float = 1.0
    retention_normalize: bool = False
    loss_gap_margin: Optional[float] = None
    loss_gap_floor: Optional[float] = None
    loss_gap_floor_agree: bool = False
    loss_gap_floor_order: str = "gap"
    loss_gap_floor_share: Optional[float] = None
    loss_gap_floor_copy_share: Optional[float] = None
    copy_loss_weight: Optional[float] = None
    copy_loss_order_weight: Optional[float] = None
    tune_steps: int = 12
    tune_lr: Optional[float] = None
    tracked_layers: Union[str, int] = "all"
    track_embeddings: bool = False
    reference_device: Optional[Union[str, torch.device]] = None
    reference_dtype: Optional[torch.dtype] = None
    global_selection: bool = False
    check_finite: bool = True
    always_keep_token_ids: tuple = ()

    def __post_init__(self) -> None:
        """Every field checked for type and range where it enters (STYLE: validate at the door); numbers and
        flags are stored as plain float / int / bool."""
        self.keep_ratio = _number("keep_ratio", self.keep_ratio, low=0.0, low_open=True, high=1.0,
                                  hint="the share of response tokens kept, e.g. 0.8")
        self.selection = _choice("selection", self.selection, SELECTIONS)
        if self.stability_weight is not None:
            self.stability_weight = _number("stability_weight", self.stability_weight, low=0.0,
                                            hint="λ >= 0 weighs stability in the total (0 ignores it)")
        self.causal_weight = _number("causal_weight", self.causal_weight, low=0.0,
                                     hint="γ >= 0 weighs the causal path (0 ignores it)")
        self.paths = _choice("paths", self.paths, PATHS)
        self.direct_layers = _choice("direct_layers", self.direct_layers, DIRECT_LAYERS)
        self.target = _choice("target", self.target, TARGETS)
        self.lr = _number("lr", self.lr, low=0.0, low_open=True,
                          hint="η, the virtual step size, must be > 0 (0 makes every value 0, a negative one "
                               "keeps the worst tokens), e.g. 1.0")
        self.threshold = _number("threshold", self.threshold, finite=False,
                                 hint='the cut of selection="threshold" (tokens with total > threshold are kept)')
        self.min_keep_per_sequence = _integer("min_keep_per_sequence", self.min_keep_per_sequence, low=0)
        self.normalize = _flag("normalize", self.normalize)
        self.cosine = _flag("cosine", self.cosine)
        self.combine = _choice("combine", self.combine, COMBINES)
        self.leave_one_out = _flag("leave_one_out", self.leave_one_out)
        self.precondition = _flag("precondition", self.precondition)
        self.precondition_damping = _number("precondition_damping", self.precondition_damping, low=0.0,
                                            low_open=True, hint="δ > 0, relative to each Fisher factor's mean")
        self.refresh = _integer("refresh", self.refresh, low=1)
        self.retention_weight = _number("retention_weight", self.retention_weight, low=0.0,
                                        hint="μ >= 0 weighs the retention batch's gradient in U (0 ignores it)")
        self.retention_normalize = _flag("retention_normalize", self.retention_normalize)
        if self.loss_gap_margin is not None:
            self.loss_gap_margin = _number("loss_gap_margin", self.loss_gap_margin, low=0.0,
                                           hint="m >= 0 (1.0 or more switches the loss gap off), e.g. 0.1")
        if self.loss_gap_floor is not None:
            self.loss_gap_floor = _number("loss_gap_floor", self.loss_gap_floor, low=0.0, finite=False,
                                          hint="τ >= 0 nats (math.inf switches it off), e.g. 2.0")
        self.loss_gap_floor_agree = _flag("loss_gap_floor_agree", self.loss_gap_floor_agree)
        self.loss_gap_floor_order = _choice("loss_gap_floor_order", self.loss_gap_floor_order,
                                            LOSS_GAP_FLOOR_ORDERS)
        if self.loss_gap_floor_share is not None:
            self.loss_gap_floor_share = _number("loss_gap_floor_share", self.loss_gap_floor_share, low=0.0, high=1.0,
                                                hint="a share of the batch's response tokens in [0, 1] (1.0: no cap), "
                                                     "e.g. 0.2")
        if self.loss_gap_floor_copy_share is not None:
            self.loss_gap_floor_copy_share = _number(
                "loss_gap_floor_copy_share", self.loss_gap_floor_copy_share, low=0.0, high=1.0,
                hint="a share of the batch's response tokens in [0, 1] (1.0: the copy's loss is not asked), e.g. 0.2")
        if self.copy_loss_weight is not None:
            self.copy_loss_weight = _number("copy_loss_weight", self.copy_loss_weight, low=0.0,
                                            hint="w >= 0 weighs rank(−ℓ_t(θ_val)) against rank(A) (0 switches it off)")
        if self.copy_loss_order_weight is not None:
            self.copy_loss_order_weight = _number(
                "copy_loss_order_weight", self.copy_loss_order_weight, low=0.0,
                hint="w_o >= 0 weighs rank(−ℓ_t(θ_val)) in the order inside the kept and dropped sets (0: off)")
        self.tune_steps = _integer("tune_steps", self.tune_steps, low=1)
        if self.tune_lr is not None:
            self.tune_lr = _number("tune_lr", self.tune_lr, low=0.0, low_open=True,
                                   hint="the AdamW learning rate of the tuned target's reference, e.g. 1e-4 "
                                        "(None: the run's)")
        self.tracked_layers = _tracked_layers(self.tracked_layers)
        self.track_embeddings = _flag("track_embeddings", self.track_embeddings)
        self.reference_device = _device("reference_device", self.reference_device)
        self.reference_dtype = _float_dtype("reference_dtype", self.reference_dtype)
        self.global_selection = _flag("global_selection", self.global_selection)
        self.check_finite = _flag("check_finite", self.check_finite)
        self.always_keep_token_ids = _token_ids("always_keep_token_ids", self.always_keep_token_ids)

    def replace(self, **changes) -> "AlphaTokenConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("reference_device", "reference_dtype"):
            if out[key] is not None:
                out[key] = str(out[key])
        return out


# ------------------------------------------------------------------ field checks (one helper per kind of field)
class ConfigError(TypeError, ValueError):
    """A bad AlphaTokenConfig field: the message names the field, what it got, and what to write instead.
    Both a TypeError and a ValueError, so either `except` catches it."""


def _got(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _number(name: str, value, *, low: Optional[float] = None, low_open: bool = False, high: Optional[float] = None,
            finite: bool = True, hint: str = "") -> float:
    """A real number (not a bool, not a string, not NaN; finite unless `finite=False`) in [low, high]
    ((low, high] with `low_open`)."""
    hint = f"; {hint}" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {_got(value)}{hint}")
    v = float(value)
    if math.isnan(v):
        raise ConfigError(f"{name} must be a number, not NaN{hint}")
    if finite and math.isinf(v):
        raise ConfigError(f"{name} must be a finite number, got {v}{hint}")
    too_low = low is not None and (v <= low if low_open else v < low)
    if low is not None and high is not None and (too_low or v > high):
        raise ConfigError(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {v:g}{hint}")
    if too_low:
        raise ConfigError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {v:g}{hint}")
    if high is not None and v > high:
        raise ConfigError(f"{name} must be <= {high:g}, got {v:g}{hint}")
    return v


def _whole(value, message: str) -> int:
    """`value` as an int (an int or a numpy integer); a bool, a float or a string raises `message, got …`."""
    if isinstance(value, bool):
        raise ConfigError(f"{message}, got {_got(value)}")
    try:
        return operator.index(value)
    except TypeError:
        raise ConfigError(f"{message}, got {_got(value)}") from None


def _integer(name: str, value, *, low: Optional[int] = None) -> int:
    """A whole number (an int, a numpy integer; not a bool, a float or a string) >= low."""
    v = _whole(value, f"{name} must be a whole number")
    if low is not None and v < low:
        raise ConfigError(f"{name} must be >= {low}, got {v}")
    return v


def _flag(name: str, value) -> bool:
    """True or False (a numpy bool too); a string such as "false" is refused: any non-empty string is truthy."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    fix = f"write {name}=False / {name}=True (a non-empty string such as 'false' would be true)" \
        if isinstance(value, str) else f"write {name}=True or {name}=False"
    raise ConfigError(f"{name} must be True or False, got {_got(value)}; {fix}")


def _choice(name: str, value, choices: tuple) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {_got(value)}")
    return value


def _tracked_layers(value):
    """'all', a block count k >= 0 (the head and the last k blocks), or a regex on module names."""
    name = "tracked_layers"
    if isinstance(value, str):
        if value != "all":
            try:
                re.compile(value)
            except re.error as err:
                raise ConfigError(f"{name} is not a valid regex ({err}): {value!r}; pass 'all', a block count "
                                  "or a regex on module names") from None
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be 'all', an int (last k blocks) or a regex string, got {_got(value)}")
    if value < 0:
        raise ConfigError(f"{name} as a block count must be >= 0, got {value}")
    return int(value)


def _device(name: str, value):
    """None, a torch.device, or a device string such as "cpu" or "cuda:0"."""
    if value is None or isinstance(value, torch.device):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be None, a torch.device or a string such as 'cpu', got {_got(value)}")
    try:
        torch.device(value)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"{name} is not a device: {value!r} ({err}); e.g. 'cpu' or 'cuda:0'") from None
    return value


def _float_dtype(name: str, value):
    """None, a floating torch.dtype, or its name ("bfloat16", "torch.float16"): returned as the torch.dtype."""
    if value is None:
        return None
    dtype = value
    if isinstance(value, str):
        dtype = getattr(torch, value[len("torch."):] if value.startswith("torch.") else value, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"{name} must be None or a floating torch dtype (torch.bfloat16, 'float16', ...), "
                          f"got {_got(value)}")
    return dtype


def _token_ids(name: str, value) -> tuple:
    """A list or tuple of token ids (whole numbers >= 0)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{name} must be a list of token ids (whole numbers >= 0), got {_got(value)}")
    ids = []
    for item in value:
        i = _whole(item, f"{name} must hold token ids (whole numbers >= 0)")
        if i < 0:
            raise ConfigError(f"{name} must hold token ids >= 0, got {i}")
        ids.append(i)
    return tuple(ids)
