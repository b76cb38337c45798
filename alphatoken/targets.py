"""The target direction U of the adaptation term (DESIGN §3.1, §5.3, §8.2), one strategy per `cfg.target`:

* "batch": U is the batch's own gradient, built per layer inside the valuation backward (`batch_direction`, from
  the layer's rows with the padding rows zeroed, `pad_zeroed`);
* "validation": U is the gradient of the mean NLL of a validation batch, refreshed every `cfg.refresh` steps
  (`validation_cycle`, `validation_directions`, through the one capture session); with a retention batch,
  U = U_val + μ·U_ret (`retention_cycle`, `with_retention`, `retention_scale`, DESIGN §3.8);
* "tuned": U is the displacement of a copy tuned on the validation batches (`tuned_target`, `alphatoken.tuned`);
* "none": no U, adaptation is 0; "auto" resolves to "tuned", "validation" or "none" (`resolve_auto`, which also
  settles direct_layers, paths, stability_weight and the loss gap's margin and floor left at "auto" / None).
"""
from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Mapping, Sized
from typing import Callable, Optional

import torch

from .batch import model_inputs, nonpad_rows, response_mask, response_rows
from .config import DEFAULT_COPY_LOSS_ORDER_WEIGHT, DEFAULT_COPY_LOSS_WEIGHT, DEFAULT_LOSS_GAP_FLOOR
from .credits import Direction, add_directions, direction_square_norm, embedding_direction, matched
from .distributed import all_reduce_sum
from .hooks import Capture, LayerRows
from .layers import TrackedLayer
from .tokens import nll_with_graph
from .tuned import TunedDirections, tuned_anchor


def default_floor_share(keep_ratio: float, selection: str) -> float:
    """loss_gap_floor_share=None resolved: the drop budget 1 − keep_ratio under selection="batch"; 1.0 (no cap)
    under "sequence" and "threshold", which have no batch budget (§3.10)."""
    return 1.0 - keep_ratio if selection == "batch" else 1.0


def resolve_auto(cfg, validation, fisher, retention=None, sharded: bool = False, stacklevel: int = 3):
    """The config with every automatic field settled (DESIGN §3.5):

    * target "auto": "tuned" when validation batches are given (the measured recipe), "validation" when a
      retention batch is given too (§3.8 adds it to the validation gradient) or the weights are FSDP2-sharded (the
      tuned copy is refused there), else "none" (with a warning saying what that means);
    * direct_layers "auto": "all" with the tuned target (§3.9; "head" with precondition=True), else "head";
    * paths "auto": "direct" when direct_layers is "all" (the causal path lowered detection there), else "full";
    * stability_weight None: 0 for the tuned target on every layer, else 0.5;
    * loss_gap_margin None: 1.0 (off; the round-9 defaults' 0.1 is replaced by the floor, §3.10);
    * loss_gap_floor None: DEFAULT_LOSS_GAP_FLOOR for the tuned target under combine="rank" (§3.10), else math.inf
      (off);
    * loss_gap_floor_share None: the drop budget 1 − keep_ratio under selection="batch" (§3.10), else 1.0 (no cap);
    * loss_gap_floor_copy_share None: 1.0 (the copy's own loss is not asked, §3.10);
    * copy_loss_order_weight None: DEFAULT_COPY_LOSS_ORDER_WEIGHT for the tuned target under combine="rank" and
      selection="batch" (§3.12), else 0;
    * copy_loss_weight None: DEFAULT_COPY_LOSS_WEIGHT for the tuned target under combine="rank" (§3.11), else 0.
    """
    target = cfg.target
    if target == "auto":
        if validation is None:
            warnings.warn(
                "AlphaToken: no validation batch, so adaptation is 0 and tokens are ranked by stability alone "
                + ("(and without a Fisher every value is 0, so selection keeps tokens by position). " if fisher is None
                   else "") + "For the recommended setting pass validation=<a few clean target-task examples>; "
                "target='batch' needs no extra data but ranks noise above clean tokens in benchmarks/quality "
                "(DESIGN §3.5)", stacklevel=stacklevel)
            target = "none"
        else:
            target = "validation" if retention is not None or sharded else "tuned"
    direct_layers = cfg.direct_layers
    if direct_layers == "auto":
        direct_layers = "all" if target == "tuned" and not cfg.precondition else "head"
    paths = cfg.paths
    if paths == "auto":
        paths = "direct" if direct_layers == "all" else "full"
    lam = cfg.stability_weight
    if lam is None:
        lam = 0.0 if target == "tuned" and direct_layers == "all" else 0.5
    margin = cfg.loss_gap_margin
    if margin is None:
        margin = 1.0
    floor = cfg.loss_gap_floor
    if floor is None:
        floor = DEFAULT_LOSS_GAP_FLOOR if target == "tuned" and cfg.combine == "rank" else math.inf
    share = cfg.loss_gap_floor_share
    if share is None:
        share = default_floor_share(cfg.keep_ratio, cfg.selection)
    copy_share = 1.0 if cfg.loss_gap_floor_copy_share is None else cfg.loss_gap_floor_copy_share
    order_weight = cfg.copy_loss_order_weight
    if order_weight is None:
        order_weight = DEFAULT_COPY_LOSS_ORDER_WEIGHT if (target == "tuned" and cfg.combine == "rank"
                                                          and cfg.selection == "batch") else 0.0
    copy_weight = cfg.copy_loss_weight
    if copy_weight is None:
        copy_weight = DEFAULT_COPY_LOSS_WEIGHT if target == "tuned" and cfg.combine == "rank" else 0.0
    return cfg.replace(target=target, direct_layers=direct_layers, paths=paths, stability_weight=lam,
                       loss_gap_margin=margin, loss_gap_floor=floor, loss_gap_floor_share=share,
                       loss_gap_floor_copy_share=copy_share, copy_loss_weight=copy_weight,
                       copy_loss_order_weight=order_weight)


# ---------------------------------------------------------------- batch
def pad_zeroed(layer: TrackedLayer, a_all: torch.Tensor, g_all: torch.Tensor, keep_rows: Optional[torch.Tensor]):
    """(a, g) over every row of the flattened batch with the padding rows zeroed rather than gathered (no read of
    the mask's count). keep_rows: (B·T, 1) bool, or None without an attention mask."""
    if keep_rows is None:
        return a_all, g_all
    g_ref = torch.where(keep_rows, g_all, 0.0)
    a_ref = torch.where(keep_rows.squeeze(1), a_all, 0) if layer.kind == "embedding" else \
        torch.where(keep_rows, a_all, 0.0)
    return a_ref, g_ref


def batch_direction(layer: TrackedLayer, a_ref, g_ref, n: int, is_global: bool) -> Direction:
    """U = (1/n) Σ_s g_s a_sᵀ over this batch's rows — over all ranks' rows under global selection."""
    if layer.kind == "embedding":
        direction = embedding_direction(a_ref, g_ref, layer.shape[1], 1.0 / n)
    elif is_global:  # always materialized: the ranks' sums add up
        a_ref, g_ref = matched(a_ref, g_ref)
        local = g_ref.T @ a_ref
        direction = Direction(matrix=local if local.dtype == torch.float64 else local.float(), scale=1.0 / n)
    else:
        return Direction.from_rows(a_ref, g_ref, 1.0 / n)
    if is_global:  # n is already the global count
        direction.matrix = all_reduce_sum(direction.matrix)
    return direction


# ---------------------------------------------------------------- validation
def validation_cycle(validation, name: str = "validation"):
    """The validation (or retention) batches, cycled: a batch dict or a non-empty iterable of them."""
    if validation is None:
        raise ValueError(f'target="validation" needs {name}=<batch or iterable of batches>')
    batches = [validation] if isinstance(validation, Mapping) else validation
    if not isinstance(batches, Iterable):
        raise TypeError(f"{name} must be a batch dict or an iterable of batch dicts")
    if isinstance(batches, Sized) and len(batches) == 0:
        raise ValueError(f"{name} is empty: pass a batch dict or a non-empty list of batch dicts")
    return itertools.cycle(batches)


def retention_cycle(retention, cfg):
    """The retention batches, cycled (DESIGN §3.8), or None without them; only the validation target takes them."""
    if retention is None:
        return None
    if cfg.target != "validation":
        raise ValueError(f'retention= adds to the validation target\'s U; this config has target={cfg.target!r} '
                         '(pass validation=<clean target-task batch> too, with target="auto" or "validation")')
    return validation_cycle(retention, "retention")


def retention_scale(directions: dict[int, Direction], retention: dict[int, Direction], weight: float,
                    normalize: bool) -> float:
    """The factor on U_ret: μ, or with `normalize` μ·‖U_val‖/‖U_ret‖ over all layers (0 when U_ret is 0)."""
    if not normalize:
        return weight
    val = sum(float(direction_square_norm(d)) for d in directions.values())
    ret = sum(float(direction_square_norm(d)) for d in retention.values())
    return weight * (val / ret) ** 0.5 if ret > 0 else 0.0


def with_retention(directions: dict[int, Direction], retention: dict[int, Direction], weight: float):
    """U = U_val + weight·U_ret per layer (DESIGN §3.8)."""
    return {i: add_directions(d, retention[i], weight) for i, d in directions.items()}


def validation_directions(capture: Capture, model, batch: dict,
                          check_finite: Callable[[torch.Tensor, str], None],
                          what: str = "validation") -> dict[int, Direction]:
    """U = ∇ of the mean NLL of `batch` (already validated), per layer, kept as factors or materialized: every
    tracked layer probed, the head at its response-predicting rows, the body at every non-padding row."""
    labels = batch["labels"]
    response = response_mask(labels)
    n = int(response.sum())
    if n == 0:
        raise ValueError(f"the {what} batch has no response tokens (every label is -100)")
    rows = response_rows(response)
    directions: dict[int, Direction] = {}

    def on_rows(r: LayerRows) -> None:  # under no_grad (CaptureSession)
        check_finite(r.g, f"the {what} output-gradient of layer {r.layer.name!r}")
        if r.layer.kind == "embedding":
            directions[r.index] = embedding_direction(r.a, r.g, r.layer.shape[1], 1.0 / n)
        else:
            directions[r.index] = Direction.from_rows(r.a.detach().clone(), r.g.detach().clone(), 1.0 / n)

    with capture.session(set(range(len(capture.layers))), labels.numel()) as session:
        logits = session.forward(model, model_inputs(model, batch))
        with torch.enable_grad():
            loss = nll_with_graph(logits[rows.b, rows.t - 1], labels[rows.b, rows.t])[1].sum()
        check_finite(loss, f"the {what} loss")
        session.backward(loss, on_rows, head_rows=rows.head, body_rows=nonpad_rows(batch), retain_graph=False)
    return directions


# ---------------------------------------------------------------- tuned
def tuned_target(layers: list[TrackedLayer], model, tuned, validation, cfg):
    """(the tuned weights as an Anchor, their per-layer displacement directions) for target="tuned"."""
    if validation is not None and not isinstance(validation, (Mapping, Iterable)):
        raise TypeError("validation must be a batch dict or an iterable of batch dicts")
    weights = tuned_anchor(layers, model, tuned, validation, cfg.tune_steps, cfg.tune_lr, cfg.reference_device,
                           cfg.reference_dtype)
    return weights, TunedDirections(layers, weights)
