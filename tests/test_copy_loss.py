"""The tuned copy's own loss ℓ_t(θ_val) (DESIGN §3.11): the part "copy_loss" against a float64 brute force (a copy of
the model with the tracked layers' tuned weights loaded), its rank fusion with the first-order value,
(rank(A) + w·rank(−ℓ_t(θ_val))) / (1 + w), before the floor, the floor's order and share over that fused value, and how
copy_loss_weight resolves and is refused."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import alphatoken as at
from alphatoken.combine import percentile_rank
from alphatoken.config import DEFAULT_COPY_LOSS_ORDER_WEIGHT, DEFAULT_COPY_LOSS_WEIGHT
from alphatoken.layers import discover_layers
from alphatoken.targets import resolve_auto

from brute import floor_between, forward, nll_per_token
from models import moved_copy, random_batch, tiny_model
from test_loss_gap import tracked_swapped


# the tuned target with the order inside and outside the drop budget left alone (copy_loss_order_weight, on by
# default since round 17): these tests hold the floor and the veto to their own formulas
TUNED = dict(target="tuned", copy_loss_order_weight=0.0)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def copy_loss_brute(model, tuned, batch):
    """(n,) ℓ_t(θ_val) and (n,) ℓ_t(θ) of the response tokens, and their (b, t): float64 forwards of the copy whose
    tracked layers hold the tuned weights, and of the model."""
    swapped = tracked_swapped(model, tuned, discover_layers(model))
    copy_nll, b, t = nll_per_token(forward(swapped, batch), batch["labels"])
    nll, _, _ = nll_per_token(forward(model, batch), batch["labels"])
    return copy_nll.detach(), nll.detach(), b, t


@pytest.mark.parametrize("family,tie", [("llama", False), ("gpt2", True)])
def test_the_copy_loss_is_the_tuned_copys_exact_nll_and_scales_with_token_weights(family, tie):
    model = tiny_model(family, seed=91, tie=tie)
    batch = random_batch(92)
    tuned = moved_copy(model, 93)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    valuer = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="tuned", copy_loss_weight=1.0),
                    tuned=tuned.state_dict())
    weights = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(94), dtype=torch.float64)
    try:
        plain = valuer.value(batch)
        weighted = valuer.value(batch, token_weights=weights)
    finally:
        valuer.close()
    want, nll, b, t = copy_loss_brute(model, tuned, batch)
    assert (want - nll).abs().max() > 1e-2  # the copy differs from the model: not a comparison of equal losses
    torch.testing.assert_close(plain.parts["copy_loss"][b, t].double(), want, rtol=2e-6, atol=1e-9)
    # the gap and the copy's loss come from one forward: G = ℓ(θ) − ℓ(θ_val)
    torch.testing.assert_close(plain.parts["loss_gap"][b, t].double(), nll - want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(weighted.parts["copy_loss"][b, t].double(), want * weights[b, t], rtol=2e-6, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())  # valuation never touches .grad
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_the_copy_loss_is_rank_fused_with_the_first_order_value_before_the_floor(weight):
    model = tiny_model("llama", seed=95)
    batch = random_batch(96)
    tuned = moved_copy(model, 97)
    want_copy, nll, b, t = copy_loss_brute(model, tuned, batch)
    gap = nll - want_copy
    assert int((gap < 0).sum()) >= 4
    tau = floor_between(gap, 2)  # two tokens below the floor, none at it
    cfg = at.AlphaTokenConfig(**TUNED, loss_gap_margin=1.0, loss_gap_floor=tau, copy_loss_weight=weight)
    tv = _quiet(at.AlphaToken, model, cfg, tuned=tuned.state_dict()).value(batch)
    first_order = percentile_rank((tv.parts["adaptation_direct"] / tv.parts["credit_norm_direct"])[b, t].double())
    fused = (first_order + weight * percentile_rank(-want_copy)) / (1 + weight)
    below = gap < -tau
    assert int(below.sum()) == 2
    want = torch.where(below, percentile_rank(gap) - 1, fused)
    got = tv.adaptation[b, t].double()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (fused - first_order).abs().max() > 0.05  # the copy's loss moved some token's rank
    torch.testing.assert_close(tv.total[b, t].double(), want, rtol=0, atol=1e-6)  # λ = 0 with the tuned target
    # the kept set is the top keep_ratio by that total
    n_keep = math.ceil(0.8 * want.numel())
    assert int(tv.mask[b, t].sum()) == n_keep
    assert got[tv.mask[b, t]].min() >= got[~tv.mask[b, t]].max()


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_the_floor_ordered_by_value_keeps_the_unfloored_order_below_every_other_token(weight):
    """loss_gap_floor_order="value" (round 15): the floored set is the same (G < −τ, brute force), still below every
    other token, but ordered among itself by the rank it would have without the floor, not by the gap."""
    model = tiny_model("llama", seed=101)
    batch = random_batch(102)
    tuned = moved_copy(model, 103)
    want_copy, nll, b, t = copy_loss_brute(model, tuned, batch)
    gap = nll - want_copy
    n_negative = int((gap < 0).sum())
    assert n_negative >= 6
    k = n_negative // 2
    tau = floor_between(gap, k)
    base = dict(**TUNED, loss_gap_margin=1.0, loss_gap_floor=tau, copy_loss_weight=weight,
                loss_gap_floor_share=1.0)  # every floored token, past the drop budget too
    tv = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**base, loss_gap_floor_order="value"),
                tuned=tuned.state_dict()).value(batch)
    by_gap = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**base), tuned=tuned.state_dict()).value(batch)
    first_order = percentile_rank((tv.parts["adaptation_direct"] / tv.parts["credit_norm_direct"])[b, t].double())
    unfloored = (first_order + weight * percentile_rank(-want_copy)) / (1 + weight)
    below = gap < -tau
    assert int(below.sum()) == k
    got = tv.adaptation[b, t].double()
    torch.testing.assert_close(got, torch.where(below, unfloored - 1, unfloored), rtol=0, atol=1e-6)
    assert got[below].max() < got[~below].min()  # still below every token that is not floored
    want_by_gap = torch.where(below, percentile_rank(gap) - 1, unfloored)
    torch.testing.assert_close(by_gap.adaptation[b, t].double(), want_by_gap, rtol=0, atol=1e-6)
    # the two orders agree outside the floor and differ inside it on these inputs
    torch.testing.assert_close(got[~below], by_gap.adaptation[b, t].double()[~below], rtol=0, atol=1e-6)
    assert not torch.equal(torch.argsort(got[below]), torch.argsort(by_gap.adaptation[b, t].double()[below]))
    with pytest.raises(ValueError, match="loss_gap_floor_order"):
        at.AlphaTokenConfig(loss_gap_floor_order="loss")


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_the_floor_takes_at_most_the_drop_budget_and_drops_the_same_tokens(weight):
    """loss_gap_floor_share (round 16): only the tokens with G < −τ among the share s of most negative gaps are
    floored; the others keep their value (the first-order rank, fused with the copy's loss at w). With s the drop
    budget 1 − keep_ratio (the default), selection drops exactly the tokens the uncapped floor drops."""
    model = tiny_model("llama", seed=81)
    batch = random_batch(82, B=4, T=10)
    tuned = moved_copy(model, 83)
    want_copy, nll, b, t = copy_loss_brute(model, tuned, batch)
    gap = nll - want_copy
    n, n_negative = gap.numel(), int((gap < 0).sum())
    assert n_negative >= 8
    k = n_negative - 1
    tau = floor_between(gap, k)
    budget = k // 2  # fewer tokens dropped than floored: the cap has work to do
    keep_ratio = 1 - (budget + 0.5) / n
    base = dict(**TUNED, loss_gap_margin=1.0, loss_gap_floor=tau, copy_loss_weight=weight,
                keep_ratio=keep_ratio, min_keep_per_sequence=0)
    valuer = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**base), tuned=tuned.state_dict())
    assert valuer.cfg.loss_gap_floor_share == pytest.approx(1 - keep_ratio)  # None resolved to the budget
    capped = valuer.value(batch)
    uncapped = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**base, loss_gap_floor_share=1.0),
                      tuned=tuned.state_dict()).value(batch)
    first_order = percentile_rank((capped.parts["adaptation_direct"] / capped.parts["credit_norm_direct"])
                                  [b, t].double())
    unfloored = (first_order + weight * percentile_rank(-want_copy)) / (1 + weight)
    gap_rank = percentile_rank(gap)
    below = gap < -tau
    assert int(below.sum()) == k
    most_negative = torch.zeros_like(below)
    most_negative[torch.argsort(gap)[:budget]] = True
    got = capped.adaptation[b, t].double()
    torch.testing.assert_close(got, torch.where(most_negative, gap_rank - 1, unfloored), rtol=0, atol=1e-6)
    torch.testing.assert_close(uncapped.adaptation[b, t].double(), torch.where(below, gap_rank - 1, unfloored),
                               rtol=0, atol=1e-6)
    past_budget = below & ~most_negative
    assert past_budget.any() and (got[past_budget] > 0).all()  # floored without the cap, valued with it
    # the same tokens dropped either way: the budget's most negative gaps
    assert torch.equal(~capped.mask[b, t], most_negative)
    assert torch.equal(capped.mask, uncapped.mask)
    # an explicit share, and one of 0: nothing floored
    share = (budget // 2 + 0.5) / n
    half = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**base, loss_gap_floor_share=share),
                  tuned=tuned.state_dict()).value(batch).adaptation[b, t].double()
    assert int((half < 0).sum()) == budget // 2 and torch.equal(half < 0, gap_rank <= share)
    none = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**base, loss_gap_floor_share=0.0),
                  tuned=tuned.state_dict()).value(batch).adaptation[b, t].double()
    torch.testing.assert_close(none, unfloored, rtol=0, atol=1e-6)


def _all_but_one_floored(seed: int):
    """A tiny model, a batch, a moved copy, the brute-force copy loss and gap, and a floor τ below which all but one
    of the negative gaps lie (at least 8 of them)."""
    model = tiny_model("llama", seed=seed)
    batch = random_batch(seed + 1, B=4, T=10)
    tuned = moved_copy(model, seed + 2)
    want_copy, nll, b, t = copy_loss_brute(model, tuned, batch)
    gap = nll - want_copy
    n_negative = int((gap < 0).sum())
    assert n_negative >= 8
    return model, batch, tuned, want_copy, b, t, gap, floor_between(gap, n_negative - 1)


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_the_floor_asks_the_copys_own_loss_when_given_a_copy_share(weight):
    """loss_gap_floor_copy_share q (round 17): a token is floored only where G < −τ, rank(G) <= s and the copy's
    own loss ranks it among the batch's q least likely tokens, rank(−ℓ_t(θ_val)) <= q; every other token keeps
    its value. Checked against the float64 brute-force gap and copy loss, with the selection it implies."""
    model, batch, tuned, want_copy, b, t, gap, tau = _all_but_one_floored(84)
    n, n_negative = gap.numel(), int((gap < 0).sum())
    share = 0.5
    base = dict(**TUNED, loss_gap_margin=1.0, loss_gap_floor=tau, loss_gap_floor_share=share,
                copy_loss_weight=weight, keep_ratio=0.5, min_keep_per_sequence=0)
    valuer = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**base), tuned=tuned.state_dict())
    assert valuer.cfg.loss_gap_floor_copy_share == 1.0  # None resolves to off
    without = valuer.value(batch)
    first_order = percentile_rank((without.parts["adaptation_direct"] / without.parts["credit_norm_direct"])
                                  [b, t].double())
    unfloored = (first_order + weight * percentile_rank(-want_copy)) / (1 + weight)
    gap_rank, copy_rank = percentile_rank(gap), percentile_rank(-want_copy)
    floored = (gap < -tau) & (gap_rank <= share + 1e-9)
    for copy_share in (0.5, 0.25):
        asked = floored & (copy_rank <= copy_share + 1e-9)
        assert asked.any() and (floored & ~asked).any()  # the copy's loss spares some floored tokens
        got = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**base, loss_gap_floor_copy_share=copy_share),
                     tuned=tuned.state_dict()).value(batch)
        torch.testing.assert_close(got.adaptation[b, t].double(), torch.where(asked, gap_rank - 1, unfloored),
                                   rtol=0, atol=1e-6)
        spared = floored & ~asked
        assert (got.adaptation[b, t][spared] > 0).all()  # valued like every unfloored token
        dropped = ~got.mask[b, t]
        assert dropped[asked].all()  # the asked floor is below every other token, so inside the dropped half
    # q = 1 asks nothing: the capped floor as before
    one = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**base, loss_gap_floor_copy_share=1.0),
                 tuned=tuned.state_dict()).value(batch)
    torch.testing.assert_close(one.adaptation, without.adaptation, rtol=0, atol=0)
    for bad in (-0.1, 1.5, float("nan"), "0.2"):
        with pytest.raises(ValueError, match="loss_gap_floor_copy_share"):
            at.AlphaTokenConfig(loss_gap_floor_copy_share=bad)


@pytest.mark.parametrize("weight,order_weight", [(0.0, 1.0), (1.0, 0.5)])
def test_the_order_weight_reorders_each_side_of_the_drop_budget_and_drops_the_same_tokens(weight, order_weight):
    """copy_loss_order_weight w_o (round 17, DESIGN §3.12): the tokens the capped floor and the first-order rank
    put in the drop budget stay there, and both sides are reordered by o = rank((a + w_o·rank(−ℓ_t(θ_val))) /
    (1 + w_o)), a the ranked adaptation before the floor: o − 1 inside the budget, o outside. Checked against the
    float64 brute-force gap and copy loss; the mask is the one without the reordering."""
    model, batch, tuned, want_copy, b, t, gap, tau = _all_but_one_floored(87)
    n, n_negative = gap.numel(), int((gap < 0).sum())
    budget = n_negative // 2 + 2  # more than the floor's share below: the first-order rank fills the rest
    keep_ratio = 1 - (budget + 0.5) / n
    share = (n_negative // 2 + 0.5) / n
    base = dict(target="tuned", loss_gap_margin=1.0, loss_gap_floor=tau, loss_gap_floor_share=share,
                copy_loss_weight=weight, keep_ratio=keep_ratio, min_keep_per_sequence=0)
    plain = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**base, copy_loss_order_weight=0.0),
                   tuned=tuned.state_dict()).value(batch)
    got = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**base, copy_loss_order_weight=order_weight),
                 tuned=tuned.state_dict()).value(batch)
    first_order = percentile_rank((plain.parts["adaptation_direct"] / plain.parts["credit_norm_direct"])
                                  [b, t].double())
    copy_rank = percentile_rank(-want_copy)
    before_floor = (first_order + weight * copy_rank) / (1 + weight)
    gap_rank = percentile_rank(gap)
    floored = (gap < -tau) & (gap_rank <= share + 1e-9)
    value = torch.where(floored, gap_rank - 1, before_floor)
    torch.testing.assert_close(plain.adaptation[b, t].double(), value, rtol=0, atol=1e-6)
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[torch.argsort(value)[:budget]] = True
    assert (dropped & ~floored).any()  # the budget holds unfloored tokens too
    order = percentile_rank((before_floor + order_weight * copy_rank) / (1 + order_weight))
    torch.testing.assert_close(got.adaptation[b, t].double(), torch.where(dropped, order - 1, order),
                               rtol=0, atol=1e-6)
    assert torch.equal(~got.mask[b, t], dropped) and torch.equal(got.mask, plain.mask)
    assert not torch.equal(torch.argsort(got.adaptation[b, t]), torch.argsort(plain.adaptation[b, t]))
    # where it applies, what it resolves to, and where it is refused
    assert _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**base), tuned=tuned.state_dict()).cfg \
        .copy_loss_order_weight == DEFAULT_COPY_LOSS_ORDER_WEIGHT
    validation = random_batch(90)
    assert resolve_auto(at.AlphaTokenConfig(selection="sequence"), validation, None).copy_loss_order_weight == 0.0
    assert resolve_auto(at.AlphaTokenConfig(target="validation"), validation, None).copy_loss_order_weight == 0.0
    with pytest.raises(ValueError, match='copy_loss_order_weight=1.0 reorders .* selection="batch"'):
        _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="tuned", selection="sequence",
                                                         copy_loss_order_weight=1.0), tuned=tuned.state_dict())
    with pytest.raises(ValueError, match='copy_loss_order_weight=1.0 needs the tuned copy of target="tuned"'):
        _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="validation", copy_loss_order_weight=1.0,
                                                         loss_gap_floor=math.inf), validation=validation)
    for bad in (-0.5, float("nan"), math.inf, "1"):
        with pytest.raises(ValueError, match="copy_loss_order_weight"):
            at.AlphaTokenConfig(copy_loss_order_weight=bad)


def test_the_copy_loss_weight_resolves_with_the_target_and_refuses_what_has_no_copy():
    model = tiny_model("llama", seed=98)
    validation = random_batch(99)
    assert at.AlphaTokenConfig().copy_loss_weight is None
    assert resolve_auto(at.AlphaTokenConfig(), validation, None).copy_loss_weight == DEFAULT_COPY_LOSS_WEIGHT
    assert resolve_auto(at.AlphaTokenConfig(target="validation"), validation, None).copy_loss_weight == 0.0
    assert resolve_auto(at.AlphaTokenConfig(target="tuned", combine="linear"), validation, None).copy_loss_weight == 0
    assert resolve_auto(at.AlphaTokenConfig(copy_loss_weight=2.0), validation, None).copy_loss_weight == 2.0
    with pytest.raises(ValueError, match='copy_loss_weight=1.0 needs the tuned copy of target="tuned"'):
        _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="validation", copy_loss_weight=1.0),
               validation=validation)
    with pytest.raises(ValueError, match='copy_loss_weight=1.0 ranks the tokens: it needs combine="rank"'):
        _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="tuned", combine="linear", copy_loss_weight=1.0),
               tuned=moved_copy(model, 100).state_dict())
    for bad in (-0.5, float("nan"), math.inf, "1", True):
        with pytest.raises(ValueError, match="copy_loss_weight"):
            at.AlphaTokenConfig(copy_loss_weight=bad)
    # off with the gap off too: the copy's forward is not run
    off = _quiet(at.AlphaToken, model, at.AlphaTokenConfig(**TUNED, loss_gap_margin=1.0,
                                                           loss_gap_floor=math.inf, copy_loss_weight=0.0),
                 tuned=moved_copy(model, 101).state_dict()).value(validation)
    assert "copy_loss" not in off.parts and "loss_gap" not in off.parts
