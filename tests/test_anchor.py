"""The drift term's Δ = W − W⁰ is decided by value: weights moved without touching their
version counter or storage pointer (a write through `.data`, an EMA update, `load_state_dict`) must give
the stability of a valuer given θ₀ explicitly, and the float64 brute force."""
from __future__ import annotations

import warnings

import pytest
import torch

import alphatoken as at
from alphatoken.layers import discover_layers

from brute import brute_values
from models import SPEC_RULE, random_batch, random_fisher, tiny_model

FIELDS = ("adaptation", "stability", "direct", "causal", "total")


def _valuer(model, fisher, reference=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return at.AlphaToken(model, at.AlphaTokenConfig(**{**SPEC_RULE, "lr": 0.7, "stability_weight": 1.3, "causal_weight": 0.6}),
                             fisher=fisher, reference=reference)


def _move_through_data(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 2:
            p.data.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _ema_towards(model, seed):
    """An EMA update of the weights towards random targets, written through `.data` (as EMA helpers do)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 2:
            p.data.lerp_(p.data + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype), 0.1)


def _load_moved_state(model, seed):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if v.dim() == 2 and v.is_floating_point():
            v.add_(0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data.copy_(state[name])  # into the same storage, through .data: no version bump


MOVES = {"data_add": _move_through_data, "ema": _ema_towards, "load_state": _load_moved_state}


@pytest.mark.parametrize("family,move", [("llama", "data_add"), ("gpt2", "data_add"), ("llama", "ema"),
                                         ("gpt2", "load_state")])
def test_weights_moved_without_a_version_bump_give_the_explicit_reference_stability(family, move):
    seed = {"llama": 3, "gpt2": 5}[family] * 10 + list(MOVES).index(move)
    model = tiny_model(family, seed=seed)
    batch = random_batch(seed + 1)
    layers = discover_layers(model)
    names = [layer.name for layer in layers]
    F = random_fisher(model, names, seed + 2)
    fisher = at.Fisher("diag", F)
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    snapshot = _valuer(model, fisher)  # θ₀ by the default snapshot
    assert not any(snapshot.anchor.moved(layer) for layer in snapshot.layers)
    versions = [(p._version, p.data_ptr()) for p in model.parameters()]
    MOVES[move](model, seed + 3)
    assert versions == [(p._version, p.data_ptr()) for p in model.parameters()], "the move must be invisible"
    got = snapshot.value(batch)
    reference = {n: theta0[f"{n}.weight"] for n in names}
    want = brute_values(model, batch, names[0], names[1:], 0.7, 1.3, 0.6, fisher=F, reference=reference)
    at_theta0 = brute_values(model, batch, names[0], names[1:], 0.7, 1.3, 0.6, fisher=F, reference=None)
    scale = want["stability"].abs().max().item()
    assert (want["stability"] - at_theta0["stability"]).abs().max().item() > 1e-3 * scale  # drift matters here
    err = (got.stability.double() - want["stability"]).abs().max().item()
    assert err <= 2e-5 * scale + 1e-9, f"stability off by {err:.3e} (scale {scale:.3e})"
    explicit = _valuer(model, fisher, reference=theta0).value(batch)
    for key in FIELDS:
        torch.testing.assert_close(getattr(got, key), getattr(explicit, key), rtol=1e-9, atol=1e-12)
    assert all(snapshot.anchor.moved(layer) for layer in snapshot.layers)


def test_weights_moved_back_to_theta0_skip_the_drift_term():
    model = tiny_model("llama", seed=71)
    names = [layer.name for layer in discover_layers(model)]
    valuer = _valuer(model, at.Fisher("diag", random_fisher(model, names, 72)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _move_through_data(model, 73)
    assert all(valuer.anchor.moved(layer) for layer in valuer.layers)
    for n, p in model.named_parameters():
        p.data.copy_(before[n])
    assert all(valuer.anchor.delta(layer) is None for layer in valuer.layers)
