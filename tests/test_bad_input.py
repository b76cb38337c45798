"""Library-level bad input: every
AlphaTokenConfig field checked for type and range with a message that names the field; a Fisher with
negative entries refused; an empty validation set, a zero num_items_in_batch and a NaN weight named."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import alphatoken as at
from alphatoken.engine import NonFiniteError

from models import random_batch, random_fisher, tiny_model

NAN, INF = float("nan"), float("inf")

BAD_FIELDS = [
    # B20
    ("keep_ratio", True), ("keep_ratio", "0.5"), ("keep_ratio", NAN), ("keep_ratio", 0), ("keep_ratio", 1.5),
    ("min_keep_per_sequence", 1.5), ("min_keep_per_sequence", True), ("min_keep_per_sequence", -1),
    ("refresh", 2.5), ("refresh", 0), ("refresh", "2"),
    ("stability_weight", -1.0), ("stability_weight", NAN), ("stability_weight", INF), ("stability_weight", True),
    ("causal_weight", -0.5), ("causal_weight", NAN), ("causal_weight", "1"),
    ("threshold", NAN), ("threshold", "0"), ("threshold", None),
    # B7
    ("lr", 0), ("lr", -1e-3), ("lr", NAN), ("lr", INF), ("lr", False),
    # B8
    ("normalize", "false"), ("normalize", 0), ("check_finite", "no"), ("track_embeddings", "true"),
    ("global_selection", 1), ("check_finite", None),
    # the rest of the fields
    ("selection", "top"), ("selection", 1), ("paths", "both"), ("target", None),
    ("tracked_layers", True), ("tracked_layers", -2), ("tracked_layers", 1.0), ("tracked_layers", "(unclosed"),
    ("reference_device", 3), ("reference_device", "gpu7"), ("reference_dtype", torch.int8),
    ("reference_dtype", "float99"), ("always_keep_token_ids", 2), ("always_keep_token_ids", [1, 2.5]),
    ("always_keep_token_ids", [-1]), ("always_keep_token_ids", [True]), ("always_keep_token_ids", "12"),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_every_config_field_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} ") as err:
        at.AlphaTokenConfig(**{field: value})
    assert isinstance(err.value, TypeError)  # one error type for both kinds: `except TypeError` catches it too


def test_good_values_are_kept_and_normalized():
    import numpy as np

    cfg = at.AlphaTokenConfig(keep_ratio=1, lr=np.float32(0.5), min_keep_per_sequence=np.int64(2),
                              normalize=np.bool_(True), threshold=-INF, stability_weight=0, causal_weight=0,
                              tracked_layers=r"mlp\.(up|down)_proj", reference_dtype="bfloat16",
                              reference_device="cpu", always_keep_token_ids=torch.tensor([3, 4]), refresh=3)
    assert cfg.keep_ratio == 1.0 and type(cfg.keep_ratio) is float
    assert cfg.lr == 0.5 and type(cfg.lr) is float
    assert cfg.min_keep_per_sequence == 2 and type(cfg.min_keep_per_sequence) is int
    assert cfg.normalize is True and cfg.threshold == -INF
    assert cfg.reference_dtype is torch.bfloat16 and cfg.always_keep_token_ids == (3, 4)
    assert at.AlphaTokenConfig(tracked_layers=2).tracked_layers == 2
    assert cfg.replace(selection="threshold").selection == "threshold"
    with pytest.raises(ValueError, match="^lr "):
        cfg.replace(lr=0)


def test_a_fisher_with_negative_or_non_finite_entries_is_refused():
    good = torch.rand(4, 3)
    at.Fisher("diag", {"w": good})
    bad = good.clone()
    bad[3, 0] = -0.1
    with pytest.raises(ValueError, match=r"Fisher entry 'w' has 1 negative entries"):
        at.Fisher("diag", {"w": bad})
    with pytest.raises(ValueError, match=r"Fisher entry 'w' has 1 non-finite"):
        at.Fisher("diag", {"w": torch.where(torch.arange(12).reshape(4, 3) == 5, NAN, good)})
    with pytest.raises(ValueError, match=r"Fisher entry 'w' f_in has 2 negative entries"):
        at.Fisher("kfac", {"w": (torch.rand(4), torch.tensor([1.0, -2.0, -0.1]))})


def _valuer(model, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return at.AlphaToken(model, at.AlphaTokenConfig(**cfg))


@pytest.mark.parametrize("validation", [[], (), "generator"])
def test_an_empty_validation_set_raises_a_value_error_not_stop_iteration(validation):
    model = tiny_model("llama", seed=201)
    batch = random_batch(202)
    warnings.simplefilter("ignore")  # fisher=None (restored by pytest after the test)
    if validation == "generator":
        valuer = at.AlphaToken(model, at.AlphaTokenConfig(target="validation"), validation=(b for b in []))
        with pytest.raises(ValueError, match="yielded no batch"):
            valuer.value(batch)
        # inside map(), a bare StopIteration would end the iteration silently with no values at all
        with pytest.raises(ValueError):
            list(map(valuer.value, [batch, batch]))
        return
    with pytest.raises(ValueError, match="validation is empty"):
        at.AlphaToken(model, at.AlphaTokenConfig(target="validation"), validation=validation)


@pytest.mark.parametrize("bad", [0, -3, 0.0, NAN, torch.tensor(0), torch.tensor([2, 3]), True])
def test_num_items_in_batch_must_be_a_positive_count(bad):
    model = tiny_model("llama", seed=205)
    batch = random_batch(206)
    valuer = _valuer(model)
    with pytest.raises(ValueError, match="num_items_in_batch must be"):
        valuer.value_and_loss(batch, num_items_in_batch=bad)
    loss = valuer.value_and_loss(batch, num_items_in_batch=torch.tensor(7))
    assert math.isfinite(loss.item())


def test_a_nan_weight_is_named_in_the_non_finite_error():
    model = tiny_model("llama", seed=209)
    batch = random_batch(210)
    valuer = _valuer(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[2, 3] = NAN
    with pytest.raises(NonFiniteError, match=r"the loss.*'model\.layers\.1\.self_attn\.v_proj\.weight' \(1 entries\)"):
        valuer.value(batch)
    F = at.Fisher("diag", random_fisher(model, valuer.tracked_layer_names(), 211))
    with torch.no_grad():  # an Inf in the head, with a Fisher: named as well
        model.model.layers[1].self_attn.v_proj.weight[2, 3] = 0.0
        model.lm_head.weight[0, 0] = INF
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        valuer = at.AlphaToken(model, at.AlphaTokenConfig(), fisher=F)
    with pytest.raises(NonFiniteError, match=r"'lm_head\.weight' \(1 entries\)"):
        valuer.value(batch)
