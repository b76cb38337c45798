"""The tuned target (DESIGN §3.6): U = θ − θ_val against float64 brute force, the tuning itself, and its errors."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import alphatoken as at
from alphatoken.layers import discover_layers
from alphatoken.losses import masked_causal_lm_loss

from brute import as_matrix
from models import SPEC_RULE, move_weights, moved_copy, random_batch, random_fisher, tiny_model
from test_engine_families import brute_values  # unties a tied head: the head credit is the head's own

FIELDS = ("adaptation", "stability", "direct", "causal", "total")


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("family,tie", [("llama", False), ("llama", True), ("gpt2", True), ("qwen2", False)])
def test_tuned_target_matches_brute_force_with_the_drift_live(family, tie):
    model = tiny_model(family, seed=61, tie=tie)
    batch = random_batch(62)
    layers = discover_layers(model)
    head, body = layers[0].name, [l.name for l in layers[1:]]
    F = random_fisher(model, [head] + body, 63)
    theta0 = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in F}
    tuned = moved_copy(model, 64, frozen=body[0])  # one layer the tuning left alone: its U is exactly 0
    cfg = at.AlphaTokenConfig(**{**SPEC_RULE, "target": "tuned", "lr": 0.7, "stability_weight": 1.3,
                                 "causal_weight": 0.6, "direct_layers": "head", "paths": "full"})  # both paths
    valuer = _quiet(at.AlphaToken, model, cfg, fisher=at.Fisher("diag", F), tuned=tuned.state_dict())
    move_weights(model, 65)  # training moved θ: U = θ − θ_val and the drift both follow the live weights
    tv = valuer.value(batch)
    modules, ref_modules = dict(model.named_modules()), dict(tuned.named_modules())
    U = {n: as_matrix(modules[n], modules[n].weight.detach() - ref_modules[n].weight.detach())
         for n in [head] + body}
    want = brute_values(model, batch, [head] + body, 0.7, 1.3, 0.6, fisher=F, reference=theta0, U=U)
    for key in FIELDS:
        got = getattr(tv, key).double()
        scale = want[key].abs().max().item()
        assert (got - want[key]).abs().max().item() <= 2e-5 * scale + 1e-9, (key, (got - want[key]).abs().max().item())
        assert torch.all(got[~tv.response] == 0)
    assert tv.adaptation[tv.response].abs().max() > 1e-3  # the target is really exercised
    assert valuer.directions.get(body.index(body[0]) + 1) is not None  # moved by training, though not by tuning
    valuer.close()


def test_an_unmoved_layer_has_no_direction():
    model = tiny_model("llama", seed=66)
    layers = discover_layers(model)
    tuned = moved_copy(model, 67, frozen=layers[1].name)
    valuer = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="tuned"), tuned=tuned)
    assert valuer.directions.get(1) is None
    assert valuer.directions.get(0) is not None
    torch.testing.assert_close(valuer.directions.get(0).matrix,
                               (model.lm_head.weight - tuned.lm_head.weight).detach())
    valuer.close()


def _validation_loss(model, batch) -> float:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float(masked_causal_lm_loss(logits, batch["labels"]))


def test_tune_on_validation_lowers_the_validation_loss_and_leaves_the_model_alone():
    model = tiny_model("llama", seed=68)
    for p in model.model.layers[0].parameters():  # the user fine-tunes only part of the model
        p.requires_grad_(False)
    val = [random_batch(69, B=2), random_batch(70, B=2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = at.tune_on_validation(model, val, steps=20, lr=1e-2, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was changed in the user's model"
    tuned = copy.deepcopy(model)
    tuned.load_state_dict(state)
    assert sum(_validation_loss(tuned, b) for b in val) < sum(_validation_loss(model, b) for b in val) - 0.1
    frozen = {k for k, _ in model.model.layers[0].named_parameters()}
    for k in state:
        moved = not torch.equal(state[k], before[k])
        if k.startswith("model.layers.0.") and k[len("model.layers.0."):] in frozen:
            assert not moved, f"frozen {k} moved"
    assert not torch.equal(state["lm_head.weight"], before["lm_head.weight"])


def test_the_valuer_tunes_its_own_reference_the_same_way():
    model = tiny_model("llama", seed=71)
    batch, val = random_batch(72), [random_batch(73, B=2), random_batch(74, B=2)]
    cfg = at.AlphaTokenConfig(target="tuned", tune_steps=5, tune_lr=3e-3)
    state = at.tune_on_validation(model, val, steps=5, lr=3e-3, progress=False)
    own = _quiet(at.AlphaToken, model, cfg, validation=val)
    given = _quiet(at.AlphaToken, model, cfg, tuned=state)
    a, b = own.value(batch), given.value(batch)
    torch.testing.assert_close(a.adaptation, b.adaptation)
    assert torch.equal(a.mask, b.mask)
    own.close()
    given.close()


def test_tuned_target_errors_name_the_problem():
    model = tiny_model("llama", seed=75)
    with pytest.raises(ValueError, match="validation="):
        _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="tuned"))
    with pytest.raises(ValueError, match='target="tuned"'):
        _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="validation"), validation=random_batch(76),
               tuned=model)
    with pytest.raises(ValueError, match="lm_head.weight"):
        _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="tuned"),
               tuned={k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match="tune_steps"):
        at.AlphaTokenConfig(target="tuned", tune_steps=0)
    frozen = tiny_model("llama", seed=77)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="requires a gradient"):
        at.tune_on_validation(frozen, random_batch(78), steps=2, lr=1e-3, progress=False)


def _copy_adaptation(model, val, batch, lr):
    """The adaptation of a valuer given the copy tuned 4 steps at `lr` by hand."""
    state = at.tune_on_validation(model, val, steps=4, lr=lr, progress=False)
    with _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="tuned"), tuned=state) as given:
        return given.value(batch).adaptation


def test_the_copy_is_tuned_at_the_run_learning_rate():
    """tune_lr=None: the copy takes the learning rate of the run's optimizer (DESIGN §3.6), through a warm-up
    scheduler (whose lr is 0 at the first step) and a wrapper holding it as `.optimizer` (as accelerate's does;
    the trainer test goes through accelerate's own); an explicit tune_lr wins."""
    model = tiny_model("llama", seed=79)
    batch, val = random_batch(80), [random_batch(81, B=2)]
    cfg = at.AlphaTokenConfig(target="tuned", tune_steps=4)
    assert cfg.tune_lr is None
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step / 10)  # warm-up: the group's lr is now 0
    assert opt.param_groups[0]["lr"] == 0.0
    want = _copy_adaptation(model, val, batch, 3e-3)
    for run_optimizer in (opt, _Wrapper(opt)):
        valuer = _strict(at.AlphaToken, model, cfg, validation=val, optimizer=run_optimizer)  # rate known
        assert valuer.cfg.tune_lr == 3e-3
        torch.testing.assert_close(valuer.value(batch).adaptation, want, rtol=0, atol=0)
        valuer.close()
    fixed = _quiet(at.AlphaToken, model, cfg.replace(tune_lr=1e-3), validation=val, optimizer=opt)
    assert fixed.cfg.tune_lr == 1e-3
    torch.testing.assert_close(fixed.value(batch).adaptation, _copy_adaptation(model, val, batch, 1e-3),
                               rtol=0, atol=0)
    fixed.close()
    assert not torch.allclose(want, _copy_adaptation(model, val, batch, 1e-3))  # the rate really matters here


class _Wrapper:
    """An optimizer wrapper in accelerate's shape: the real one as `.optimizer`, its groups passed through."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups


def _strict(fn, *args, **kwargs):
    """fn(...) with every warning an error but the one about fisher=None."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*fisher=None.*")
        return fn(*args, **kwargs)


@pytest.mark.filterwarnings("ignore:AlphaToken. fisher=None")
def test_without_the_run_rate_the_copy_is_tuned_at_the_default_with_a_warning():
    model = tiny_model("llama", seed=82)
    val = random_batch(83, B=2)
    cfg = at.AlphaTokenConfig(target="tuned", tune_steps=2)
    cases = [(None, "no optimizer"), (torch.optim.SGD(model.parameters(), lr=0.5), "SGD")]
    for optimizer, why in cases:
        with pytest.warns(UserWarning, match=rf"tune_lr=0\.0001 \(.*{why}"):
            valuer = at.AlphaToken(model, cfg, validation=val, optimizer=optimizer)
        assert valuer.cfg.tune_lr == at.config.DEFAULT_TUNE_LR
        valuer.close()
    _strict(at.AlphaToken, model, cfg, tuned=model.state_dict()).close()  # a ready copy: nothing to warn about
    with pytest.raises(TypeError, match="optimizer must be the run's torch optimizer"):
        _quiet(at.AlphaToken, model, cfg, validation=val, optimizer=3e-4)
