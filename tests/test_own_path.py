"""direct_layers="all" (DESIGN §3.9): the token's own first-order value over every tracked layer, by forward mode,
against a float64 brute force of one backward per token."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import alphatoken as at
from alphatoken.layers import discover_layers

from brute import as_matrix, capture_credits, forward, nll_per_token
from models import moved_copy, random_batch, tiny_model


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def own_brute(model, batch, tangents: dict, eta: float, weights=None) -> torch.Tensor:
    """η⟨∇ℓ_t, U⟩ of every response token (in nll_per_token's order), one backward of ℓ_t alone per token;
    `tangents`: {parameter name: U in the parameter's layout}."""
    params = dict(model.named_parameters())
    names = list(tangents)
    nll, b, t = nll_per_token(forward(model, batch), batch["labels"])
    out = []
    for i in range(nll.numel()):
        grads = torch.autograd.grad(nll[i], [params[n] for n in names], retain_graph=True)
        out.append(eta * sum((g * tangents[n]).sum() for g, n in zip(grads, names)))
    values = torch.stack(out)
    return values * weights[b, t] if weights is not None else values


def _check(got: torch.Tensor, want: torch.Tensor):
    err = (got - want).abs().max().item()
    assert err <= 1e-9 + 2e-6 * want.abs().max().item(), err  # HF RMSNorm computes in float32
    assert want.abs().max().item() > 1e-3  # the comparison is not between zeros


@pytest.mark.parametrize("family,tie,embeddings", [("llama", False, False), ("llama", True, True),
                                                   ("gpt2", True, False), ("gemma2", True, False)])
@pytest.mark.parametrize("paths", ["direct", "full"])
def test_tuned_target_own_values_match_a_backward_per_token(family, tie, embeddings, paths):
    model = tiny_model(family, seed=81, tie=tie)
    batch = random_batch(82)
    layers = discover_layers(model, track_embeddings=embeddings)
    tuned = moved_copy(model, 83, frozen=layers[1].name)  # one layer the tuning left alone: U = 0 there
    cfg = at.AlphaTokenConfig(target="tuned", direct_layers="all", paths=paths, lr=0.7, cosine=False,
                              combine="linear", stability_weight=0.0, track_embeddings=embeddings)
    valuer = _quiet(at.AlphaToken, model, cfg, tuned=tuned.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tv = valuer.value(batch)
    valuer.close()
    # U per parameter is the displacement θ − θ_val, once per parameter (a tied weight is not counted twice)
    tuned_params = dict(tuned.named_parameters())
    modules = dict(model.named_modules())
    tracked = {id(modules[l.name].weight) for l in layers}
    tangents = {n: p.detach() - tuned_params[n].detach() for n, p in model.named_parameters() if id(p) in tracked}
    want = own_brute(model, batch, tangents, 0.7)
    _, b, t = nll_per_token(forward(model, batch), batch["labels"])
    _check(tv.parts["adaptation_direct"][b, t].double(), want)
    assert all(p.grad is None for p in model.parameters())  # valuation never touches .grad
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("family,tie", [("llama", False), ("gpt2", True)])
def test_validation_target_own_values_match_a_backward_per_token(family, tie):
    model = tiny_model(family, seed=84, tie=tie)
    batch, validation = random_batch(85), random_batch(86)
    layers = discover_layers(model)
    cfg = at.AlphaTokenConfig(target="validation", direct_layers="all", paths="direct", lr=1.3)
    valuer = _quiet(at.AlphaToken, model, cfg, validation=validation)
    tv = valuer.value(batch)
    valuer.close()
    # U of each tracked layer: the validation loss's gradient through that layer's own use (a tied head's U is
    # the head's part only, which is then the tangent of the shared parameter)
    credits = capture_credits(model, validation, [l.name for l in layers])
    _, vb, _ = nll_per_token(forward(model, validation), validation["labels"])
    modules, names = dict(model.named_modules()), {id(p): n for n, p in model.named_parameters()}
    tangents = {}
    for l in layers:
        a, g = credits[l.name]
        u = torch.einsum("bto,bti->oi", g, a) / vb.numel()
        tangents[names[id(modules[l.name].weight)]] = as_matrix(modules[l.name], u)  # (d_out, d_in) → storage
    want = own_brute(model, batch, tangents, 1.3)
    _, b, t = nll_per_token(forward(model, batch), batch["labels"])
    _check(tv.parts["adaptation_direct"][b, t].double(), want)
    # the head-only direct path is a different number: the body layers' part of ∇ℓ_t is really there
    head_only = _quiet(at.AlphaToken, model, cfg.replace(direct_layers="head"), validation=validation).value(batch)
    assert (head_only.parts["adaptation_direct"][b, t].double() - want).abs().max() > 1e-3


def test_token_weights_scale_the_own_values():
    model = tiny_model("llama", seed=87)
    batch = random_batch(88)
    weights = torch.rand(batch["labels"].shape, generator=torch.Generator().manual_seed(89), dtype=torch.float64)
    tuned = moved_copy(model, 90)
    cfg = at.AlphaTokenConfig(target="tuned", direct_layers="all", paths="direct", cosine=False, combine="linear")
    tv = _quiet(at.AlphaToken, model, cfg, tuned=tuned.state_dict()).value(batch, token_weights=weights)
    layers = discover_layers(model)
    modules, tuned_modules = dict(model.named_modules()), dict(tuned.named_modules())
    names = {id(p): n for n, p in model.named_parameters()}
    tangents = {names[id(modules[l.name].weight)]:
                modules[l.name].weight.detach() - tuned_modules[l.name].weight.detach() for l in layers}
    want = own_brute(model, batch, tangents, 1.0, weights)
    _, b, t = nll_per_token(forward(model, batch), batch["labels"])
    _check(tv.parts["adaptation_direct"][b, t].double(), want)


def test_own_path_refuses_what_it_cannot_value():
    model = tiny_model("llama", seed=91)
    with pytest.raises(ValueError, match='direct_layers="all" needs U before'):
        _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="batch", direct_layers="all"))
    with pytest.raises(ValueError, match="precondition"):
        _quiet(at.AlphaToken, model, at.AlphaTokenConfig(target="validation", direct_layers="all",
                                                         precondition=True),
               fisher=_quiet(at.estimate_fisher, model, [random_batch(92)], kind="kfac", progress=False),
               validation=random_batch(93))
    with pytest.raises(ValueError, match="direct_layers"):
        at.AlphaTokenConfig(direct_layers="body")


@pytest.mark.parametrize("reentrant", [False, True])
def test_own_values_are_the_same_under_gradient_checkpointing(reentrant):
    """The forward-mode pass runs through a checkpointed model in training mode (the default recipe's path)."""
    model = tiny_model("llama", seed=94)
    batch = random_batch(95)
    tuned = moved_copy(model, 96).state_dict()
    cfg = at.AlphaTokenConfig(target="tuned", direct_layers="all", paths="direct")
    plain = _quiet(at.AlphaToken, model, cfg, tuned=tuned).value(batch)
    checkpointed = copy.deepcopy(model).train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    valuer = _quiet(at.AlphaToken, checkpointed, cfg, tuned=tuned)
    loss = valuer.value_and_loss(batch)
    loss.backward()  # the masked loss still trains through the checkpoints
    got = valuer.last_values
    torch.testing.assert_close(got.parts["adaptation_direct"], plain.parts["adaptation_direct"])
    assert torch.equal(got.mask, plain.mask)
    assert all(p.grad is not None for p in checkpointed.parameters() if p.requires_grad and p.dim() == 2)


def test_the_head_runs_on_response_rows_in_chunks_as_the_full_logits_do():
    """With the fused head trusted, the forward stops at the head's input and the head runs on the response rows
    in chunks (no (B·T, V) logits); the values equal the full-logits pass, here across several chunks."""
    from alphatoken.own import own_adaptation

    model = tiny_model("gemma2", seed=97, tie=True)  # a soft-capped head
    batch = random_batch(98)
    tuned = moved_copy(model, 99).state_dict()
    cfg = at.AlphaTokenConfig(target="tuned", direct_layers="all", paths="direct", cosine=False, combine="linear")
    valuer = _quiet(at.AlphaToken, model, cfg, tuned=tuned)
    valuer.chunk_rows = 2
    got = valuer.value(batch)
    assert valuer.head_fusable  # the chunked branch ran
    labels = batch["labels"]
    b, t = got.response.nonzero(as_tuple=True)
    T = labels.shape[1]
    full = own_adaptation(model, valuer.layers, valuer.directions.get, batch, b * T + t - 1, labels[b, t], 1.0,
                          "once", transform=None)
    torch.testing.assert_close(got.parts["adaptation_direct"][b, t].double(), full.double())
