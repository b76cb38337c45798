"""The tuned copy's exact loss gap (DESIGN §3.10): G_t = ℓ_t(θ) − ℓ_t(θ_val) against a float64 brute force (a copy
of the model with the tracked layers' tuned weights loaded), and its veto min(rank(A), rank(G) + m)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import alphatoken as at
from alphatoken.combine import percentile_rank
from alphatoken.layers import discover_layers
from alphatoken.targets import resolve_auto

from brute import forward, nll_per_token
from models import moved_copy, random_batch, tiny_model


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def tracked_swapped(model, tuned, layers):
    """A copy of `model` whose tracked layers hold `tuned`'s weights, every other parameter left as it is."""
    swapped = copy.deepcopy(model)
    modules, tuned_modules = dict(swapped.named_modules()), dict(tuned.named_modules())
    with torch.no_grad():
        for layer in layers:
            modules[layer.name].weight.copy_(tuned_modules[layer.name].weight)
    return swapped


def gap_brute(model, tuned, layers, batch):
    nll, b, t = nll_per_token(forward(model, batch), batch["labels"])
    nll_tuned, _, _ = nll_per_token(forward(tracked_swapped(model, tuned, layers), batch), batch["labels"])
    return (nll - nll_tuned).detach(), b, t


@pytest.mark.parametrize("family,tie,embeddings", [("llama", False, False), ("llama", True, True),
                                                   ("gpt2", True, False), ("gemma2", True, False)])
def test_the_loss_gap_is_the_exact_nll_difference_to_the_tuned_weights(family, tie, embeddings):
    model = tiny_model(family, seed=61, tie=tie)
    batch = random_batch(62)
    layers = discover_layers(model, track_embeddings=embeddings)
    # every 2-D weight moved, the untracked ones too (position embeddings): the gap swaps the tracked ones only
    tuned = moved_copy(model, 63, frozen=layers[1].name)
    cfg = at.AlphaTokenConfig(target="tuned", track_embeddings=embeddings)
    valuer = _quiet(at.AlphaToken, model, cfg, tuned=tuned.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tv = valuer.value(batch)
    valuer.close()
    want, b, t = gap_brute(model, tuned, layers, batch)
    got = tv.parts["loss_gap"][b, t].double()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-9)  # HF RMSNorm computes in float32
    assert want.abs().max() > 1e-2  # the comparison is not between zeros
    assert all(p.grad is None for p in model.parameters())  # valuation never touches .grad
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_the_gap_vetoes_by_rank_and_the_margin_switches_it_off():
    model = tiny_model("llama", seed=64)
    batch = random_batch(65)
    tuned = moved_copy(model, 66).state_dict()
    with_gap = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="tuned", loss_gap_margin=0.05),
                      tuned=tuned).value(batch)
    without = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="tuned", loss_gap_margin=1.0),
                     tuned=tuned).value(batch)
    resp = with_gap.response
    first_order = percentile_rank((with_gap.parts["adaptation_direct"] / with_gap.parts["credit_norm_direct"])
                                  [resp].double())
    gap_rank = percentile_rank(with_gap.parts["loss_gap"][resp].double())
    want = torch.minimum(first_order, gap_rank + 0.05)
    torch.testing.assert_close(with_gap.adaptation[resp].double(), want, rtol=0, atol=1e-6)
    assert (want < first_order - 1e-9).any()  # the veto changed some token's rank here
    assert "loss_gap" not in without.parts  # off: not computed
    torch.testing.assert_close(without.adaptation[resp].double(), first_order, rtol=0, atol=1e-6)


def test_the_gap_is_scaled_by_token_weights_and_identical_in_chunks():
    model = tiny_model("gemma2", seed=67, tie=True)  # a soft-capped head: the chunked branch applies the transform
    batch = random_batch(68)
    tuned = moved_copy(model, 69)
    weights = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(70), dtype=torch.float64)
    valuer = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="tuned"), tuned=tuned.state_dict())
    valuer.chunk_rows = 2
    got = valuer.value(batch, token_weights=weights)
    assert valuer.head_fusable  # the chunked branch ran
    want, b, t = gap_brute(model, tuned, discover_layers(model), batch)
    torch.testing.assert_close(got.parts["loss_gap"][b, t].double(), want * weights[b, t], rtol=2e-6, atol=1e-9)


def test_the_margin_resolves_with_the_target_and_refuses_what_has_no_copy():
    model = tiny_model("llama", seed=71)
    validation = random_batch(72)
    assert resolve_auto(at.AlphaTokenConfig(), validation, None).loss_gap_margin == 0.1  # auto → tuned
    assert resolve_auto(at.AlphaTokenConfig(target="validation"), validation, None).loss_gap_margin == 1.0
    assert resolve_auto(at.AlphaTokenConfig(target="tuned", combine="linear"), validation, None).loss_gap_margin == 1.0
    assert resolve_auto(at.AlphaTokenConfig(loss_gap_margin=0.3), validation, None).loss_gap_margin == 0.3
    with pytest.raises(ValueError, match='needs the tuned copy of target="tuned"'):
        _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="validation", loss_gap_margin=0.1),
               validation=validation)
    with pytest.raises(ValueError, match='needs combine="rank"'):
        _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="tuned", combine="linear", loss_gap_margin=0.1),
               tuned=moved_copy(model, 73).state_dict())
    with pytest.raises(ValueError, match="loss_gap_margin"):
        at.AlphaTokenConfig(loss_gap_margin=-0.1)
