"""The valuation engine against float64 brute force (DESIGN §3) on tiny Llama, GPT-2 and Qwen2 models."""
from __future__ import annotations

import math
import warnings
import zlib

import pytest
import torch

import alphatoken as at
from alphatoken.engine import NonFiniteError
from alphatoken.layers import discover_layers

from brute import brute_fisher, brute_values, capture_credits, nll_per_token, target_gradients
from models import FAMILIES, SPEC_RULE, move_weights, random_batch, random_fisher, tiny_model

FIELDS = ("adaptation", "stability", "direct", "causal", "total")


def make_valuer(model, fisher=None, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return at.AlphaToken(model, at.AlphaTokenConfig(**{**SPEC_RULE, **cfg}), fisher=fisher)


def names_of(model, **kw):
    layers = discover_layers(model, **kw)
    return layers[0].name, [l.name for l in layers[1:]]


def assert_fields(tv, want, response, rtol=2e-5):
    for key in FIELDS:
        got = getattr(tv, key).double()
        scale = want[key].abs().max().item() + 1e-12
        err = (got - want[key]).abs().max().item()
        assert err <= rtol * scale + 1e-9, f"{key}: max error {err:.3e} (scale {scale:.3e})"
        assert torch.all(got[~response] == 0), f"{key} is non-zero outside the response"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("moved", [False, True], ids=["theta0", "drifted"])
def test_every_field_matches_brute_force(family, moved):
    seed = zlib.crc32(f"{family}-{moved}".encode()) % 1000  # str hash() is salted per process: not replayable
    model = tiny_model(family, seed=seed)
    batch = random_batch(seed + 1)
    head, body = names_of(model)
    F = random_fisher(model, [head] + body, seed + 2)
    fisher = at.Fisher("diag", F)
    eta, lam, gamma = 0.7, 1.3, 0.6
    valuer = make_valuer(model, fisher, lr=eta, stability_weight=lam, causal_weight=gamma)
    reference = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in F}
    if moved:
        move_weights(model, seed + 3)
    tv = valuer.value(batch)
    want = brute_values(model, batch, head, body, eta, lam, gamma, fisher=F, reference=reference)
    assert_fields(tv, want, tv.response)
    if moved:  # the drift term is really exercised: stability differs from its θ₀ value
        at0 = brute_values(model, batch, head, body, eta, lam, gamma, fisher=F, reference=None)
        assert (at0["stability"] - want["stability"]).abs().max() > 1e-3


def test_sum_of_direct_values_is_the_head_gradient_inner_product():
    model = tiny_model("llama", seed=11)
    batch = random_batch(12)
    head, _ = names_of(model)
    eta = 0.3
    tv = make_valuer(model, lr=eta, stability_weight=0.0).value(batch)
    hm = dict(model.named_modules())[head]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll, _, _ = nll_per_token(logits, batch["labels"])
    g_sum = torch.autograd.grad(nll.sum(), hm.weight)[0]
    U = target_gradients(model, batch, [head])[head]
    assert math.isclose(tv.direct.double().sum().item(), eta * (g_sum * U).sum().item(), rel_tol=1e-5)


def test_causal_values_equal_captured_bilinear_forms():
    model = tiny_model("qwen2", seed=21)
    batch = random_batch(22)
    head, body = names_of(model)
    tv = make_valuer(model, causal_weight=1.0, stability_weight=0.0).value(batch)
    U = target_gradients(model, batch, body)
    credits = capture_credits(model, batch, body)
    want = torch.zeros_like(tv.causal, dtype=torch.float64)
    for name in body:
        a, g = credits[name]
        want += torch.einsum("bto,oi,bti->bt", g, U[name], a)
    want[~tv.response] = 0
    torch.testing.assert_close(tv.causal.double(), want, rtol=2e-5, atol=1e-7)
    last = tv.response.long().cumsum(1).argmax(1)  # the last response token has no later loss
    assert torch.all(tv.causal[torch.arange(len(last)), last] == 0)


def test_fisher_norm_term_equals_explicit_outer_product():
    model = tiny_model("gpt2", seed=31)
    batch = random_batch(32)
    head, body = names_of(model)
    F = random_fisher(model, [head] + body, 33)
    tv = make_valuer(model, at.Fisher("diag", F), target="none", lr=1.0, paths="full").value(batch)
    credits = capture_credits(model, batch, [head] + body)
    want = torch.zeros_like(tv.stability, dtype=torch.float64)
    b, t = tv.response.nonzero(as_tuple=True)
    for bi, ti in zip(b.tolist(), t.tolist()):
        a, g = credits[head]
        want[bi, ti] -= 0.5 * (F[head] * torch.outer(g[bi, ti - 1], a[bi, ti - 1]) ** 2).sum()
        for name in body:
            a, g = credits[name]
            want[bi, ti] -= 0.5 * (F[name] * torch.outer(g[bi, ti], a[bi, ti]) ** 2).sum()
    torch.testing.assert_close(tv.stability.double(), want, rtol=2e-5, atol=1e-8)
    assert torch.all(tv.adaptation == 0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kfac_equals_diag_with_the_explicit_outer_product(family):
    model = tiny_model(family, seed=41)
    batch = random_batch(42)
    head, body = names_of(model)
    g = torch.Generator().manual_seed(43)
    factors, full = {}, {}
    for name, diag in random_fisher(model, [head] + body, 44).items():
        f_out = torch.rand(diag.shape[0], generator=g, dtype=torch.float64) + 0.1
        f_in = torch.rand(diag.shape[1], generator=g, dtype=torch.float64) + 0.1
        factors[name], full[name] = (f_out, f_in), torch.outer(f_out, f_in)
    v_kfac = make_valuer(model, at.Fisher("kfac", factors), lr=0.5)
    v_diag = make_valuer(model, at.Fisher("diag", full), lr=0.5)
    move_weights(model, 45)
    a, b = v_kfac.value(batch), v_diag.value(batch)
    for key in FIELDS:
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-5, atol=1e-7)
    assert (a.stability[a.response] != 0).all()


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost", "materialized"])
def test_validation_target_matches_brute_force(ghost, monkeypatch):
    from alphatoken import kernels as K

    monkeypatch.setattr(K, "use_ghost", lambda *args: ghost)
    model = tiny_model("llama", seed=51)
    batch, val = random_batch(52), random_batch(53, B=2)
    head, body = names_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        valuer = at.AlphaToken(model, at.AlphaTokenConfig(**{**SPEC_RULE, "target": "validation",
                                                                 "stability_weight": 0.0}), validation=val)
    tv = valuer.value(batch)
    U = target_gradients(model, val, [head] + body)
    want = brute_values(model, batch, head, body, target=U)
    assert_fields(tv, want, tv.response)


def test_validation_batches_refresh_every_k_steps():
    model = tiny_model("llama", seed=54)
    batch = random_batch(55)
    vals = [random_batch(56, B=2), random_batch(57, B=2)]
    cfg = at.AlphaTokenConfig(target="validation", stability_weight=0.0, refresh=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        valuer = at.AlphaToken(model, cfg, validation=vals)
    runs = [valuer.value(batch).total for _ in range(3)]
    torch.testing.assert_close(runs[0], runs[1])  # same direction for `refresh` steps
    assert (runs[2] - runs[0]).abs().max() > 1e-4  # then the next validation batch


def test_target_none_and_direct_paths():
    model = tiny_model("llama", seed=61)
    batch = random_batch(62)
    full = make_valuer(model).value(batch)
    direct = make_valuer(model, paths="direct").value(batch)
    torch.testing.assert_close(direct.direct, full.direct)
    assert torch.all(direct.causal == 0)
    torch.testing.assert_close(direct.total, direct.direct)
    none = make_valuer(model, target="none").value(batch)
    assert torch.all(none.adaptation == 0) and torch.all(none.total == 0)


def test_normalize_divides_each_objective_by_its_rms():
    model = tiny_model("gpt2", seed=65)
    batch = random_batch(66)
    head, body = names_of(model)
    F = at.Fisher("diag", random_fisher(model, [head] + body, 67))
    raw = make_valuer(model, F, stability_weight=2.0).value(batch)
    norm = make_valuer(model, F, stability_weight=2.0, normalize=True).value(batch)
    r = raw.response
    rms_a = raw.adaptation[r].double().pow(2).mean().sqrt()
    rms_s = raw.stability[r].double().pow(2).mean().sqrt()
    torch.testing.assert_close(norm.adaptation.double(), raw.adaptation.double() / rms_a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(norm.stability.double(), raw.stability.double() / rms_s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(norm.total, norm.adaptation + 2.0 * norm.stability, rtol=1e-5, atol=1e-6)


def test_tracked_embeddings_add_their_one_hot_credits():
    model = tiny_model("llama", seed=71)
    batch = random_batch(72)
    without = make_valuer(model, stability_weight=0.0).value(batch)
    with_emb = make_valuer(model, stability_weight=0.0, track_embeddings=True).value(batch)
    name = [n for n, m in model.named_modules() if m is model.get_input_embeddings()][0]
    emb = model.get_input_embeddings()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll, _, _ = nll_per_token(logits, batch["labels"])
    U = torch.autograd.grad(nll.mean(), emb.weight)[0]  # (vocab, d)
    grads = {}

    def keep_output(module, args, out):
        out.retain_grad()
        grads["out"] = out

    h = emb.register_forward_hook(keep_output)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    h.remove()
    nll_per_token(logits, batch["labels"])[0].sum().backward()
    model.zero_grad(set_to_none=True)
    g = grads["out"].grad
    want = (g * U[batch["input_ids"]]).sum(-1)
    want[~without.response] = 0
    torch.testing.assert_close((with_emb.causal - without.causal).double(), want, rtol=1e-4, atol=1e-6)


def test_tied_head_is_valued_through_its_own_use():
    model = tiny_model("gpt2", seed=75, tie=True)
    assert model.lm_head.weight is model.transformer.wte.weight
    batch = random_batch(76)
    head, _ = names_of(model)
    tv = make_valuer(model, stability_weight=0.0).value(batch)
    a, g = capture_credits(model, batch, [head])[head]
    n = int(tv.response.sum())
    U = torch.einsum("bto,bti->oi", g, a) / n  # the head's own use, not the tied weight's full gradient
    want = torch.zeros_like(tv.direct, dtype=torch.float64)
    b, t = tv.response.nonzero(as_tuple=True)
    want[b, t] = torch.einsum("no,oi,ni->n", g[b, t - 1], U, a[b, t - 1])
    torch.testing.assert_close(tv.direct.double(), want, rtol=2e-5, atol=1e-7)


# ------------------------------------------------------------------ Fisher estimation
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_estimated_diag_fisher_matches_brute_force(family, tmp_path):
    model = tiny_model(family, seed=81)
    batch = random_batch(82)
    head, body = names_of(model)
    fisher = at.estimate_fisher(model, [batch], kind="diag", labels="data")
    want = brute_fisher(model, batch, [head] + body)
    for name in [head] + body:
        torch.testing.assert_close(fisher[name].double(), want[name], rtol=1e-10, atol=1e-12)
    path = tmp_path / "fisher.safetensors"
    fisher.save(str(path))
    loaded = at.Fisher.load(str(path))
    assert loaded.kind == "diag" and set(loaded.names()) == set(fisher.names())
    torch.testing.assert_close(loaded[head], fisher[head])


def test_estimated_kfac_factors_match_brute_force(tmp_path):
    model = tiny_model("llama", seed=85)
    batch = random_batch(86)
    head, body = names_of(model)
    fisher = at.estimate_fisher(model, [batch, random_batch(87)], kind="kfac", labels="data")
    batches = [batch, random_batch(87)]
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for name in body[:3]:
        f_out = torch.zeros_like(fisher[name][0], dtype=torch.float64)
        f_in = torch.zeros_like(fisher[name][1], dtype=torch.float64)
        for b in batches:
            a, g = capture_credits(model, b, [name])[name]
            keep = b["attention_mask"].bool()
            f_out += (g[keep] ** 2).sum(0)
            f_in += (a[keep] ** 2).sum(0)
        torch.testing.assert_close(fisher[name][0].double(), f_out / n, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fisher[name][1].double(), f_in / n, rtol=1e-10, atol=1e-12)
    path = tmp_path / "kfac.safetensors"
    fisher.save(str(path))
    loaded = at.Fisher.load(str(path))
    torch.testing.assert_close(loaded[body[0]][1], fisher[body[0]][1])


def test_fisher_with_model_labels_is_reproducible_and_positive():
    model = tiny_model("llama", seed=88)
    batch = random_batch(89)
    f1 = at.estimate_fisher(model, [batch], generator=torch.Generator().manual_seed(0))
    f2 = at.estimate_fisher(model, [batch], generator=torch.Generator().manual_seed(0))
    f3 = at.estimate_fisher(model, [batch], labels="data")
    name = f1.names()[0]
    torch.testing.assert_close(f1[name], f2[name])
    assert (f1[name] >= 0).all() and f1[name].sum() > 0
    assert not torch.allclose(f1[name], f3[name])


# ------------------------------------------------------------------ selection and masked losses
def test_mask_keeps_exactly_the_top_tokens():
    model = tiny_model("llama", seed=91)
    batch = random_batch(92, B=4, T=12)
    tv = make_valuer(model, keep_ratio=0.4, min_keep_per_sequence=0).value(batch)
    n = int(tv.response.sum())
    k = math.ceil(0.4 * n)
    assert int(tv.mask.sum()) == k
    kept = tv.total[tv.mask]
    dropped = tv.total[tv.response & ~tv.mask]
    assert kept.min() >= dropped.max()
    assert not (tv.mask & ~tv.response).any()


def test_selection_modes_ties_and_minimum_per_sequence():
    from alphatoken.select import select_tokens

    resp = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    total = torch.tensor([[0, 5.0, 5.0, 1.0, 5.0], [0, -3.0, -2.0, 0, 0], [0, 0, 0, 0, 0]])
    cfg = at.AlphaTokenConfig(keep_ratio=0.5, min_keep_per_sequence=0)
    # 6 response tokens -> 3 kept; the three ties at 5.0 all beat -2
    assert select_tokens(total, resp, cfg).nonzero().tolist() == [[0, 1], [0, 2], [0, 4]]
    cfg = at.AlphaTokenConfig(keep_ratio=0.34, min_keep_per_sequence=0)  # 3 kept of 6 -> ties by position
    two = select_tokens(total, resp, cfg.replace(keep_ratio=0.3))
    assert two.nonzero().tolist() == [[0, 1], [0, 2]]
    with_min = select_tokens(total, resp, cfg.replace(keep_ratio=0.3, min_keep_per_sequence=1))
    assert with_min.nonzero().tolist() == [[0, 1], [1, 2]]  # sequence 1 keeps its best; budget 2 in all
    seq = select_tokens(total, resp, cfg.replace(selection="sequence", keep_ratio=0.5))
    assert seq.nonzero().tolist() == [[0, 1], [0, 2], [1, 2]]
    thr = select_tokens(total, resp, cfg.replace(selection="threshold", threshold=2.0, min_keep_per_sequence=1))
    assert thr.nonzero().tolist() == [[0, 1], [0, 2], [0, 4], [1, 2]]



@pytest.mark.parametrize("selection", ["batch", "sequence", "threshold"])
def test_selection_follows_the_sequences_when_they_are_reordered(selection):
    """Distinct values (no ties): reordering the sequences of a batch reorders the mask the same way."""
    from alphatoken.select import select_tokens

    g = torch.Generator().manual_seed(zlib.crc32(selection.encode()))
    B, T = 6, 10
    total = torch.randn(B, T, generator=g)
    resp = torch.rand(B, T, generator=g) < 0.7
    resp[:, 0] = False
    resp[2] = False  # a sequence without response tokens
    cfg = at.AlphaTokenConfig(keep_ratio=0.35, selection=selection, threshold=0.3, min_keep_per_sequence=1)
    mask = select_tokens(total, resp, cfg)
    perm = torch.randperm(B, generator=g)
    assert not torch.equal(perm, torch.arange(B))
    assert torch.equal(select_tokens(total[perm], resp[perm], cfg), mask[perm])
    assert not (mask & ~resp).any() and mask.sum() > 0
    assert bool((mask.sum(1)[resp.any(1)] >= 1).all())  # min_keep_per_sequence


def test_value_and_loss_is_the_mean_over_kept_tokens_and_the_masked_step():
    model = tiny_model("llama", seed=95)
    batch = random_batch(96)
    valuer = make_valuer(model, keep_ratio=0.5)
    loss = valuer.value_and_loss(batch)
    tv = valuer.last_values
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    nll, b, t = nll_per_token(logits, batch["labels"])
    kept = tv.mask[b, t]
    hand = nll[kept].mean()
    assert math.isclose(loss.item(), hand.item(), rel_tol=1e-10)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    hand.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-12)
    model.zero_grad(set_to_none=True)
    n_items = 7
    loss2 = valuer.value_and_loss(batch, num_items_in_batch=n_items)
    assert math.isclose(loss2.item(), nll[kept].sum().item() / n_items, rel_tol=1e-10)


def test_value_under_no_grad_gives_the_same_values():
    """value() inside torch.no_grad() (an eval loop) still runs the valuation backward of paths="full",
    and the validation direction's own backward too."""
    model = tiny_model("qwen2", seed=91)
    batch, validation = random_batch(92, pad="left"), random_batch(94)
    fisher = at.Fisher("diag", random_fisher(model, make_valuer(model).tracked_layer_names(), seed=93))
    for target in ("batch", "validation"):
        def valuer():
            return at.AlphaToken(model, at.AlphaTokenConfig(target=target), fisher=fisher, validation=validation)

        want = valuer().value(batch)
        with torch.no_grad():
            got = valuer().value(batch)
        for key in ("adaptation", "stability", "direct", "causal", "total"):
            torch.testing.assert_close(getattr(got, key), getattr(want, key), rtol=1e-12, atol=1e-12)
        assert bool(got.causal.abs().sum() > 0) and torch.equal(got.mask, want.mask)


def test_value_never_touches_grad():
    model = tiny_model("gpt2", seed=97)
    batch = random_batch(98)
    params = list(model.parameters())
    for i, p in enumerate(params):
        if i % 2:
            p.grad = torch.randn_like(p)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    head, body = names_of(model)
    valuer = make_valuer(model, at.Fisher("diag", random_fisher(model, [head] + body, 99)))
    valuer.value(batch)
    for p, g in zip(params, before):
        if g is None:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, g)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_no_hook_left_after_close_or_after_an_exception():
    model = tiny_model("llama", seed=101)
    batch = random_batch(102)
    assert _hook_count(model) == 0
    with make_valuer(model) as valuer:
        valuer.value(batch)
        assert _hook_count(model) == 0  # hooks live only inside a call
    assert _hook_count(model) == 0
    valuer = make_valuer(model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite"):
        valuer.value(batch)
    assert _hook_count(model) == 0
    valuer.close()
    with pytest.raises(RuntimeError, match="closed"):
        valuer.value(batch)


def test_nan_gradient_names_the_layer():
    model = tiny_model("llama", seed=103)
    batch = random_batch(104)
    valuer = make_valuer(model)

    def poison_gradient(module, args, out):  # NaN from the mlp output into up/gate_proj's output-gradients
        out.register_hook(lambda grad: torch.full_like(grad, float("nan")))

    hook = model.model.layers[1].mlp.register_forward_hook(poison_gradient)
    try:
        with pytest.raises(NonFiniteError, match=r"output-gradient captured at layer 'model\.layers\.1\.mlp\.(up|gate)_proj'"):
            valuer.value(batch)
    finally:
        hook.remove()


def test_empty_batch_gives_empty_mask_and_a_zero_loss_that_backpropagates():
    model = tiny_model("llama", seed=105)
    batch = random_batch(106)
    batch["labels"][:] = -100
    valuer = make_valuer(model)
    assert not valuer.value(batch).mask.any()
    loss = valuer.value_and_loss(batch)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_inputs_get_clear_errors():
    model = tiny_model("llama", seed=107)
    batch = random_batch(108)
    valuer = make_valuer(model)
    bad = dict(batch, labels=batch["labels"][:, :-1])
    with pytest.raises(ValueError, match="labels.*shape"):
        valuer.value(bad)
    with pytest.raises(ValueError, match="no 'labels'"):
        valuer.value({"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="linear output head"):
        make_valuer(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="target=\"validation\""):
        at.AlphaToken(model, at.AlphaTokenConfig(target="validation"), fisher=None)
    with pytest.raises(ValueError, match="keep_ratio"):
        at.AlphaTokenConfig(keep_ratio=0)
    head, body = names_of(model)
    partial = at.Fisher("diag", random_fisher(model, [head], 1))
    with pytest.raises(ValueError, match="no entry for tracked layers"):
        make_valuer(model, partial)


# ------------------------------------------------------------------ the model around the engine
def test_last_k_blocks_shorten_the_valuation_backward():
    model = tiny_model("llama", seed=111, layers=3)
    batch = random_batch(112)
    calls = []

    def count_backward(module, args, out):  # a gradient reaching block 0's last projection
        out.register_hook(lambda grad: calls.append(1))

    model.model.layers[0].mlp.down_proj.register_forward_hook(count_backward)
    all_layers = make_valuer(model)
    last_one = make_valuer(model, tracked_layers=1)
    assert len(last_one.layers) == 1 + 7  # the head + q, k, v, o, gate, up, down of the last block
    assert all(n.startswith("model.layers.2.") for n in last_one.tracked_layer_names()[1:])
    all_layers.value(batch)
    assert calls, "the full valuation reaches block 0"
    calls.clear()
    last_one.value(batch)
    assert not calls, "tracking the last block only must not run the backward through block 0"
    pattern = make_valuer(model, tracked_layers=r"mlp\.(up|down)_proj")
    assert len(pattern.layers) == 1 + 6


def test_gradient_checkpointing_gives_the_same_values():
    model = tiny_model("llama", seed=115)
    batch = random_batch(116)
    head, body = names_of(model)
    fisher = at.Fisher("diag", random_fisher(model, [head] + body, 117))
    model.train()
    plain = make_valuer(model, fisher).value(batch)
    model.gradient_checkpointing_enable()
    ckpt = make_valuer(model, fisher).value(batch)
    for key in FIELDS:
        torch.testing.assert_close(getattr(ckpt, key), getattr(plain, key), rtol=1e-6, atol=1e-9)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(RuntimeError, match="use_reentrant"):
        make_valuer(model, fisher).value(batch)


def test_left_and_right_padding_give_the_same_values():
    model = tiny_model("llama", seed=121)
    right, left = random_batch(122, pad="right"), random_batch(122, pad="left")
    valuer = make_valuer(model)
    r, l = valuer.value(right), valuer.value(left)
    T = right["input_ids"].shape[1]
    for i in range(right["input_ids"].shape[0]):
        n = int(right["attention_mask"][i].sum())
        for key in FIELDS + ("mask",):
            torch.testing.assert_close(getattr(l, key)[i, T - n:], getattr(r, key)[i, :n], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_runs_and_stays_close_to_float32():
    model = tiny_model("llama", seed=125, dtype=torch.float32)
    batch = random_batch(126)
    v32 = make_valuer(model).value(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vbf = make_valuer(model).value(batch)
    r = v32.response
    assert torch.isfinite(vbf.total).all()
    rel = (vbf.total[r] - v32.total[r]).norm() / v32.total[r].norm()
    assert rel < 0.1, rel
    loss = make_valuer(model).value_and_loss(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf = make_valuer(model).value_and_loss(batch)
    loss_bf.backward()
    assert math.isclose(loss.item(), loss_bf.item(), rel_tol=0.05)


def test_reference_snapshot_can_live_on_cpu_in_bf16():
    model = tiny_model("llama", seed=131, dtype=torch.float32)
    batch = random_batch(132)
    head, body = names_of(model)
    fisher = at.Fisher("diag", {k: v.float() for k, v in random_fisher(model, [head] + body, 133).items()})
    exact = make_valuer(model, fisher)
    small = make_valuer(model, fisher, reference_device="cpu", reference_dtype=torch.bfloat16)
    assert small.anchor.nbytes() * 2 == exact.anchor.nbytes()
    move_weights(model, 134, scale=0.1)
    a, b = exact.value(batch), small.value(batch)
    r = a.response
    assert (a.stability[r] - b.stability[r]).abs().max() < 0.05 * a.stability[r].abs().max()


class _HalfRouted(torch.nn.Module):
    """An MoE-like block: its expert sees only some token rows, which do not map to (B, T) positions."""

    def __init__(self, inner, d):
        super().__init__()
        self.inner = inner
        self.expert = torch.nn.Linear(d, d, dtype=torch.float64)

    def forward(self, x):
        out = self.inner(x)
        flat = out.reshape(-1, out.shape[-1])
        routed = flat[::2] + self.expert(flat[::2])
        return torch.cat([routed, flat[1::2]]).reshape(out.shape)


def test_unsupported_tracked_module_is_named():
    model = tiny_model("llama", seed=141)
    model.model.layers[0].mlp = _HalfRouted(model.model.layers[0].mlp, 16)
    batch = random_batch(142)
    with pytest.raises(ValueError, match=r"unsupported tracked module 'model\.layers\.0\.mlp\.expert'.*tracked_layers"):
        make_valuer(model).value(batch)
    make_valuer(model, tracked_layers=r"^(?!.*expert)").value(batch)  # excluded by a regex, it runs


def test_lora_adapters_are_tracked_in_place_of_frozen_base_layers():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", seed=145)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                       lora_dropout=0.0, init_lora_weights=False))
    lora.eval()
    valuer = make_valuer(lora)
    names = valuer.tracked_layer_names()
    assert names[0].endswith("lm_head")
    assert names[1:] and all(".lora_A." in n or ".lora_B." in n for n in names[1:]), names
    batch = random_batch(146)
    tv = valuer.value(batch)
    head = dict(lora.named_modules())[names[0]]
    head.weight.requires_grad_(True)  # the brute force takes per-token gradients of the (frozen) head
    try:
        want = brute_values(lora, batch, names[0], names[1:], lam=0.0)
    finally:
        head.weight.requires_grad_(False)
    assert_fields(tv, want, tv.response)


def test_a_wrapped_model_is_unwrapped_for_discovery_and_still_runs_forward():
    model = tiny_model("gpt2", seed=151)

    class Wrapper(torch.nn.Module):  # what DDP and accelerate look like from the outside
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    wrapped = Wrapper(model)
    batch = random_batch(152)
    tv = make_valuer(wrapped).value(batch)
    assert wrapped.calls == 1
    torch.testing.assert_close(tv.total, make_valuer(model).value(batch).total)


def test_always_kept_token_ids_survive_selection():
    model = tiny_model("llama", seed=161)
    batch = random_batch(162, B=4, T=12)
    protected_id = int(batch["labels"][0, -1])
    plain = make_valuer(model, keep_ratio=0.3, min_keep_per_sequence=0).value(batch)
    kept = make_valuer(model, keep_ratio=0.3, min_keep_per_sequence=0, always_keep_token_ids=(protected_id,)).value(batch)
    is_protected = plain.response & (batch["labels"] == protected_id)
    assert is_protected.any()
    assert kept.mask[is_protected].all()
    assert int(kept.mask.sum()) == max(math.ceil(0.3 * int(plain.response.sum())), int(is_protected.sum()))
    others = kept.mask & ~is_protected  # the rest of the budget still goes to the top values
    if others.any():
        assert kept.total[others].min() >= kept.total[plain.response & ~kept.mask].max()
