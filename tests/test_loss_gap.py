"""The tuned copy's exact loss gap (DESIGN §3.10): G_t = ℓ_t(θ) − ℓ_t(θ_val) against a float64 brute force (a copy
of the model with the tracked layers' tuned weights loaded), its veto min(rank(A), rank(G) + m) and its floor
(a token with G < −τ ranks below every other, the most negative gap lowest)."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import alphatoken as at
from alphatoken.combine import percentile_rank
from alphatoken.layers import discover_layers
from alphatoken.targets import resolve_auto

from brute import floor_between, forward, nll_per_token
from models import moved_copy, random_batch, tiny_model


# the tuned target with the order inside and outside the drop budget left alone (copy_loss_order_weight, on by
# default since round 17): these tests hold the floor and the veto to their own formulas
TUNED = dict(target="tuned", copy_loss_order_weight=0.0)


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
    with_gap = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**TUNED, loss_gap_margin=0.05,
                                                                loss_gap_floor=math.inf), tuned=tuned).value(batch)
    without = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**TUNED, loss_gap_margin=1.0,
                                                               loss_gap_floor=math.inf), tuned=tuned).value(batch)
    resp = with_gap.response
    first_order = percentile_rank((with_gap.parts["adaptation_direct"] / with_gap.parts["credit_norm_direct"])
                                  [resp].double())
    gap_rank = percentile_rank(with_gap.parts["loss_gap"][resp].double())
    want = torch.minimum(first_order, gap_rank + 0.05)
    torch.testing.assert_close(with_gap.adaptation[resp].double(), want, rtol=0, atol=1e-6)
    assert (want < first_order - 1e-9).any()  # the veto changed some token's rank here
    assert "loss_gap" not in without.parts  # off: not computed
    torch.testing.assert_close(without.adaptation[resp].double(), first_order, rtol=0, atol=1e-6)


def test_the_floor_ranks_the_tokens_the_copy_rules_out_by_more_than_tau_nats_lowest():
    model = tiny_model("llama", seed=74)
    batch = random_batch(75)
    tuned = moved_copy(model, 76)
    want_gap, b, t = gap_brute(model, tuned, discover_layers(model), batch)
    n_negative = int((want_gap < 0).sum())
    assert n_negative >= 4  # some tokens the copy makes less likely, so the floor has work to do
    k = n_negative // 2
    tau = floor_between(want_gap, k)
    floored = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**TUNED, loss_gap_margin=1.0, loss_gap_floor=tau,
                                                                           loss_gap_floor_agree=False),
                     tuned=tuned.state_dict()).value(batch)
    plain = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**TUNED, loss_gap_margin=1.0,
                                                             loss_gap_floor=math.inf),
                   tuned=tuned.state_dict()).value(batch)
    assert "loss_gap" not in plain.parts  # neither margin nor floor: the gap is not computed
    got = floored.adaptation[b, t].double()
    first_order = percentile_rank((floored.parts["adaptation_direct"] / floored.parts["credit_norm_direct"])
                                  [b, t].double())
    below = want_gap < -tau
    assert int(below.sum()) == k
    # the brute force's ranks: floored tokens get rank(G) − 1, in (−1, 0]; the others keep their first-order rank
    want = torch.where(below, percentile_rank(want_gap) - 1, first_order)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got[below].max() < got[~below].min()  # every floored token ranks below every other
    order = torch.argsort(want_gap[below])
    assert torch.all(torch.diff(got[below][order]) > 0)  # the most negative gap lowest
    torch.testing.assert_close(plain.adaptation[b, t].double(), first_order, rtol=0, atol=1e-6)
    # with a keep ratio below the floored share, what is dropped is floored, the most negative gap first
    kept = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**TUNED, loss_gap_margin=1.0, loss_gap_floor=tau,
                                                            loss_gap_floor_agree=False,
                                                            keep_ratio=1 - (k - 1) / want_gap.numel()),
                  tuned=tuned.state_dict()).value(batch).mask[b, t]
    most_negative = torch.zeros_like(below)
    most_negative[torch.argsort(want_gap)[:k - 1]] = True
    assert torch.equal(~kept, most_negative)


def test_the_agreeing_floor_takes_only_the_tokens_whose_first_order_value_is_negative_too():
    # loss_gap_floor_agree (round 12, off by default): a token the copy rules out by more than τ nats is floored
    # only where its first-order adaptation is below 0 as well; any other keeps its first-order rank
    model = tiny_model("llama", seed=77)
    batch = random_batch(78)
    tuned = moved_copy(model, 79)
    want_gap, b, t = gap_brute(model, tuned, discover_layers(model), batch)
    assert not at.AlphaTokenConfig().loss_gap_floor_agree  # off by default
    cfg = at.AlphaTokenConfig(**TUNED, loss_gap_margin=1.0, loss_gap_floor=0.0, loss_gap_floor_agree=True,
                              loss_gap_floor_share=1.0)  # every floored token, past the drop budget too
    tv = _quiet(at.AlphaToken, model, cfg, tuned=tuned.state_dict()).value(batch)
    first_order_value = (tv.parts["adaptation_direct"] / tv.parts["credit_norm_direct"])[b, t].double()
    below = want_gap < 0
    agree = below & (first_order_value < 0)
    # both kinds of floored-by-the-gap token occur, so the agreement decides something here
    assert agree.any() and (below & ~agree).any()
    want = torch.where(agree, percentile_rank(want_gap) - 1, percentile_rank(first_order_value))
    got = tv.adaptation[b, t].double()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got[agree].max() < got[~agree].min()
    gap_alone = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**TUNED, loss_gap_margin=1.0,
                                                                 loss_gap_floor=0.0, loss_gap_floor_agree=False,
                                                                 loss_gap_floor_share=1.0),
                       tuned=tuned.state_dict()).value(batch).adaptation[b, t].double()
    assert (gap_alone[below & ~agree] < 0).all() and (got[below & ~agree] > 0).all()


def test_the_veto_and_the_agreeing_floor_together_match_the_brute_force_ranks():
    # both on: the floor's tokens get rank(G) − 1, every other token min(rank(A), rank(G) + m)
    model = tiny_model("llama", seed=81)
    batch = random_batch(82)
    tuned = moved_copy(model, 83)
    want_gap, b, t = gap_brute(model, tuned, discover_layers(model), batch)
    margin = 0.05
    tv = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**TUNED, loss_gap_margin=margin, loss_gap_floor=0.0,
                                                          loss_gap_floor_agree=True, loss_gap_floor_share=1.0),
                tuned=tuned.state_dict()).value(batch)
    first_order_value = (tv.parts["adaptation_direct"] / tv.parts["credit_norm_direct"])[b, t].double()
    gap_rank = percentile_rank(want_gap)
    floored = (want_gap < 0) & (first_order_value < 0)
    vetoed = torch.minimum(percentile_rank(first_order_value), gap_rank + margin)
    want = torch.where(floored, gap_rank - 1, vetoed)
    torch.testing.assert_close(tv.adaptation[b, t].double(), want, rtol=0, atol=1e-6)
    assert floored.any() and (vetoed[~floored] < percentile_rank(first_order_value)[~floored] - 1e-9).any()


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
    assert resolve_auto(at.AlphaTokenConfig(), validation, None).loss_gap_margin == 1.0  # off: the floor replaced it
    assert resolve_auto(at.AlphaTokenConfig(target="validation"), validation, None).loss_gap_margin == 1.0
    assert resolve_auto(at.AlphaTokenConfig(target="tuned", combine="linear"), validation, None).loss_gap_margin == 1.0
    assert resolve_auto(at.AlphaTokenConfig(loss_gap_margin=0.3), validation, None).loss_gap_margin == 0.3
    assert resolve_auto(at.AlphaTokenConfig(), validation, None).loss_gap_floor == 2.0  # auto → tuned
    with pytest.raises(ValueError, match='needs the tuned copy of target="tuned"'):
        _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="validation", loss_gap_margin=0.1),
               validation=validation)
    with pytest.raises(ValueError, match='it needs combine="rank"'):
        _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="tuned", combine="linear", loss_gap_margin=0.1),
               tuned=moved_copy(model, 73).state_dict())
    with pytest.raises(ValueError, match="loss_gap_margin"):
        at.AlphaTokenConfig(loss_gap_margin=-0.1)


def test_the_floor_resolves_with_the_target_and_refuses_what_has_no_copy():
    from alphatoken.config import DEFAULT_LOSS_GAP_FLOOR
    model = tiny_model("llama", seed=77)
    validation = random_batch(78)
    assert resolve_auto(at.AlphaTokenConfig(), validation, None).loss_gap_floor == DEFAULT_LOSS_GAP_FLOOR
    assert resolve_auto(at.AlphaTokenConfig(target="validation"), validation, None).loss_gap_floor == math.inf
    linear = at.AlphaTokenConfig(target="tuned", combine="linear")
    assert resolve_auto(linear, validation, None).loss_gap_floor == math.inf
    assert resolve_auto(at.AlphaTokenConfig(loss_gap_floor=2.5), validation, None).loss_gap_floor == 2.5
    assert at.AlphaTokenConfig(loss_gap_floor=math.inf).loss_gap_floor == math.inf  # inf: off
    with pytest.raises(ValueError, match='loss_gap_floor=0.5 needs the tuned copy of target="tuned"'):
        _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="validation", loss_gap_floor=0.5),
               validation=validation)
    with pytest.raises(ValueError, match='loss_gap_floor=0.5 ranks the tokens: it needs combine="rank"'):
        _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="tuned", combine="linear", loss_gap_margin=1.0,
                                                         loss_gap_floor=0.5),
               tuned=moved_copy(model, 79).state_dict())
    for bad in (-1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="loss_gap_floor"):
            at.AlphaTokenConfig(loss_gap_floor=bad)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="loss_gap_floor_agree"):
            at.AlphaTokenConfig(loss_gap_floor_agree=bad)


def test_the_floor_share_resolves_to_the_drop_budget_and_refuses_a_bad_share():
    validation = random_batch(84)
    assert at.AlphaTokenConfig().loss_gap_floor_share is None
    assert resolve_auto(at.AlphaTokenConfig(), validation, None).loss_gap_floor_share == pytest.approx(0.2)
    lower_keep = resolve_auto(at.AlphaTokenConfig(keep_ratio=0.6), validation, None)
    assert lower_keep.loss_gap_floor_share == pytest.approx(0.4)
    assert resolve_auto(at.AlphaTokenConfig(selection="sequence"), validation, None).loss_gap_floor_share == 1.0
    assert resolve_auto(at.AlphaTokenConfig(selection="threshold"), validation, None).loss_gap_floor_share == 1.0
    assert resolve_auto(at.AlphaTokenConfig(loss_gap_floor_share=0.5), validation, None).loss_gap_floor_share == 0.5
    for bad in (-0.1, 1.5, float("nan"), "0.2", True):
        with pytest.raises(ValueError, match="loss_gap_floor_share"):
            at.AlphaTokenConfig(loss_gap_floor_share=bad)
