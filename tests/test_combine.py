"""Combination rules (alphatoken/combine.py, DESIGN §3) against float64 brute force: per-path parts, credit
norms, the cosine adaptation and the leave-one-out batch target."""
from __future__ import annotations

import warnings

import pytest
import torch

import alphatoken as at
from alphatoken.layers import discover_layers

from brute import brute_values, capture_credits, head_token_gradients, target_gradients
from models import SPEC_RULE, random_batch, random_fisher, tiny_model


def _valuer(model, fisher=None, validation=None, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return at.AlphaToken(model, at.AlphaTokenConfig(**{**SPEC_RULE, **cfg}), fisher=fisher, validation=validation)


def _names(model):
    layers = discover_layers(model)
    return layers[0].name, [layer.name for layer in layers[1:]]


def brute_parts(model, batch, head, body, U, eta):
    """Per-token (b, t) → dict of float64 parts from separate backwards and captured credits."""
    head_grads, b, t = head_token_gradients(model, batch, head)
    credits = capture_credits(model, batch, body)
    out = {}
    for i in range(len(b)):
        bi, ti = int(b[i]), int(t[i])
        C = head_grads[i]
        sq_c, a_c = 0.0, 0.0
        for name in body:
            a, g = credits[name]
            Cl = torch.outer(g[bi, ti], a[bi, ti])
            sq_c += float((Cl * Cl).sum())
            a_c += eta * float((Cl * U[name]).sum())
        out[(bi, ti)] = {"ad": eta * float((C * U[head]).sum()), "ac": a_c,
                         "nd": float((C * C).sum()) ** 0.5, "nc": sq_c ** 0.5, "head_credit": C}
    return out, len(b)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_parts_and_credit_norms_match_brute_force(family):
    model = tiny_model(family, seed=301)
    batch = random_batch(302)
    head, body = _names(model)
    eta = 0.8
    tv = _valuer(model, lr=eta).value(batch)
    U = target_gradients(model, batch, [head] + body)
    want, _ = brute_parts(model, batch, head, body, U, eta)
    for (bi, ti), w in want.items():
        got = {k: float(v[bi, ti]) for k, v in tv.parts.items()}
        for key, ref in (("adaptation_direct", w["ad"]), ("adaptation_causal", w["ac"]),
                         ("credit_norm_direct", w["nd"]), ("credit_norm_causal", w["nc"])):
            assert abs(got[key] - ref) <= 1e-6 * (1 + abs(ref)), (key, bi, ti, got[key], ref)
    for key, value in tv.parts.items():
        assert torch.all(value[~tv.response] == 0), f"{key} is non-zero outside the response"
    assert float(tv.parts["credit_norm_causal"][tv.response].min()) >= 0


def test_last_token_of_a_sequence_has_no_causal_credit():
    model = tiny_model("llama", seed=311)
    batch = random_batch(312)
    tv = _valuer(model).value(batch)
    labels = batch["labels"]
    for b in range(labels.shape[0]):
        last = int((labels[b] != -100).nonzero().max())
        assert float(tv.parts["credit_norm_causal"][b, last]) == 0.0
        assert float(tv.parts["adaptation_causal"][b, last]) == 0.0


@pytest.mark.parametrize("target", ["batch", "validation"])
def test_cosine_divides_each_path_by_its_credit_norm(target):
    model = tiny_model("qwen2", seed=321)
    batch, val = random_batch(322), random_batch(323, B=2)
    head, body = _names(model)
    eta, gamma = 0.5, 0.7
    kw = dict(lr=eta, causal_weight=gamma, stability_weight=0.0, target=target)
    validation = val if target == "validation" else None
    tv = _valuer(model, validation=validation, cosine=True, **kw).value(batch)
    U = target_gradients(model, val if target == "validation" else batch, [head] + body)
    want, _ = brute_parts(model, batch, head, body, U, eta)
    for (bi, ti), w in want.items():
        cos_d = w["ad"] / w["nd"]
        cos_c = w["ac"] / w["nc"] if w["nc"] > 0 else 0.0
        expected = cos_d + gamma * cos_c
        got = float(tv.adaptation[bi, ti])
        assert abs(got - expected) <= 1e-6 * (1 + abs(expected)), (bi, ti, got, expected)
        assert abs(float(tv.total[bi, ti]) - got) <= 1e-12 + 1e-9 * abs(got)  # λ = 0
    # the cosine of the direct path is bounded by |U_head| (Cauchy–Schwarz)
    bound = eta * float(U[head].norm())
    assert float(tv.parts["adaptation_direct"][tv.response].abs().max()) > 0
    got_cos = (tv.direct[tv.response]).abs().max()
    assert float(got_cos) <= bound * (1 + 1e-9)


def test_leave_one_out_removes_the_token_own_credit_from_the_batch_target():
    model = tiny_model("llama", seed=331)
    batch = random_batch(332)
    head, body = _names(model)
    eta = 0.9
    tv = _valuer(model, lr=eta, stability_weight=0.0, leave_one_out=True).value(batch)
    plain = _valuer(model, lr=eta, stability_weight=0.0).value(batch)
    U = target_gradients(model, batch, [head] + body)
    want, n = brute_parts(model, batch, head, body, U, eta)
    credits = capture_credits(model, batch, body)
    for (bi, ti), w in want.items():
        C = w["head_credit"]
        loo_direct = eta * float((C * (U[head] - C / n)).sum())
        loo_causal = 0.0
        for name in body:
            a, g = credits[name]
            Cl = torch.outer(g[bi, ti], a[bi, ti])
            loo_causal += eta * float((Cl * (U[name] - Cl / n)).sum())
        assert abs(float(tv.parts["adaptation_direct"][bi, ti]) - loo_direct) <= 1e-6 * (1 + abs(loo_direct))
        assert abs(float(tv.parts["adaptation_causal"][bi, ti]) - loo_causal) <= 1e-6 * (1 + abs(loo_causal))
        expected = loo_direct + loo_causal
        assert abs(float(tv.total[bi, ti]) - expected) <= 1e-6 * (1 + abs(expected))
    # it lowers every token's value by its own self-influence, never raises one
    r = tv.response
    assert torch.all(tv.total[r] <= plain.total[r] + 1e-12)
    assert float((plain.total[r] - tv.total[r]).max()) > 0


def test_leave_one_out_is_ignored_without_a_batch_target():
    model = tiny_model("llama", seed=341)
    batch, val = random_batch(342), random_batch(343, B=2)
    a = _valuer(model, target="validation", validation=val, leave_one_out=True).value(batch)
    b = _valuer(model, target="validation", validation=val).value(batch)
    torch.testing.assert_close(a.total, b.total)


def test_default_rule_still_matches_the_linear_brute_force():
    """The parts recombine into the §3 fields exactly (the rule did not change the default combination)."""
    model = tiny_model("gpt2", seed=351)
    batch = random_batch(352)
    head, body = _names(model)
    F = random_fisher(model, [head] + body, 353)
    eta, lam, gamma = 0.6, 1.7, 0.4
    tv = _valuer(model, at.Fisher("diag", F), lr=eta, stability_weight=lam, causal_weight=gamma,
                 target="batch").value(batch)
    want = brute_values(model, batch, head, body, eta, lam, gamma, fisher=F)
    for key in ("adaptation", "stability", "total"):
        err = (getattr(tv, key).double() - want[key]).abs().max().item()
        assert err <= 1e-6 * (1 + want[key].abs().max().item()), key
    p = tv.parts
    torch.testing.assert_close(tv.adaptation.double(), (p["adaptation_direct"] + gamma * p["adaptation_causal"]).double())
    torch.testing.assert_close(tv.stability.double(), (p["stability_direct"] + gamma * p["stability_causal"]).double())


def test_rank_fusion_ranks_each_objective_over_the_batch():
    model = tiny_model("llama", seed=361)
    batch = random_batch(362)
    head, body = _names(model)
    F = at.Fisher("diag", random_fisher(model, [head] + body, 363))
    lam = 0.5
    linear = _valuer(model, F, stability_weight=lam, cosine=True).value(batch)
    ranked = _valuer(model, F, stability_weight=lam, cosine=True, combine="rank").value(batch)
    r = linear.response
    n = int(r.sum())
    for key in ("adaptation", "stability"):
        values, ranks = linear.__getattribute__(key)[r].double(), ranked.__getattribute__(key)[r].double()
        # brute force: 1 + the number of tokens with a smaller value (values here are distinct), over n
        want = torch.tensor([(1 + int((values < v).sum())) / n for v in values], dtype=torch.float64)
        torch.testing.assert_close(ranks, want)
        assert torch.all(ranked.__getattribute__(key)[~r] == 0)
    torch.testing.assert_close(ranked.total, ranked.adaptation + lam * ranked.stability)
    # selection follows the fused ranks
    order = torch.argsort(ranked.total[r], descending=True, stable=True)
    k = int(ranked.mask[r].sum())
    assert torch.all(ranked.mask[r][order[:k]])


def test_combine_must_be_a_known_rule():
    with pytest.raises(ValueError, match="combine"):
        at.AlphaTokenConfig(combine="product")


def test_defaults_are_the_measured_rule_and_auto_target_follows_the_validation_batch():
    cfg = at.AlphaTokenConfig()
    assert (cfg.target, cfg.cosine, cfg.combine) == ("auto", True, "rank")
    assert (cfg.stability_weight, cfg.paths, cfg.direct_layers, cfg.keep_ratio) == (None, "auto", "auto", 0.8)
    model = tiny_model("llama", seed=371)
    batch, val = random_batch(372), random_batch(373, B=2)
    head, body = _names(model)
    F = at.Fisher("diag", random_fisher(model, [head] + body, 374))
    with pytest.warns(UserWarning, match="no validation batch"):
        plain = at.AlphaToken(model, at.AlphaTokenConfig(), fisher=F)
    assert (plain.cfg.target, plain.cfg.direct_layers, plain.cfg.paths, plain.cfg.stability_weight) == \
        ("none", "head", "full", 0.5)
    tv = plain.value(batch)
    assert torch.all(tv.adaptation == 0) and float(tv.stability[tv.response].max()) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when the recommended setting is complete
        run_optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)  # the copy is tuned at its rate (§3.6)
        auto = at.AlphaToken(model, at.AlphaTokenConfig(), fisher=F, validation=val, optimizer=run_optimizer)
    # the measured recipe (DESIGN §3.5, §3.9): the tuned target on every layer, the direct path, adaptation alone
    assert (auto.cfg.target, auto.cfg.direct_layers, auto.cfg.paths, auto.cfg.stability_weight) == \
        ("tuned", "all", "direct", 0.0)
    explicit = _valuer(model, F, validation=val, target="tuned", direct_layers="all", paths="direct", cosine=True,
                       combine="rank", stability_weight=0.0, keep_ratio=0.8, tune_lr=3e-4)
    torch.testing.assert_close(auto.value(batch).total, explicit.value(batch).total)
    # a retention batch belongs to the validation target (§3.8): auto takes that, with the head-only rule
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = at.AlphaToken(model, at.AlphaTokenConfig(), fisher=F, validation=val, retention=random_batch(375))
    assert (kept.cfg.target, kept.cfg.direct_layers, kept.cfg.paths, kept.cfg.stability_weight) == \
        ("validation", "head", "full", 0.5)
    # a field set by the user is kept
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mine = at.AlphaToken(model, at.AlphaTokenConfig(stability_weight=0.25, paths="full"), fisher=F,
                             validation=val)
    assert (mine.cfg.target, mine.cfg.stability_weight, mine.cfg.paths) == ("tuned", 0.25, "full")


@pytest.mark.parametrize("target", ["batch", "validation"])
def test_preconditioned_adaptation_is_the_kfac_metric_inner_product(target):
    """precondition=True: adaptation = η⟨P ⊙ C, U⟩ and |C|² = ⟨C, P ⊙ C⟩ per path, P = p_out p_inᵀ with
    p = (f + δ·mean f)^{-1/2} from the kfac factors, against credits built explicitly in float64."""
    model = tiny_model("gpt2", seed=381)
    batch, val = random_batch(382), random_batch(383, B=2)
    head, body = _names(model)
    g = torch.Generator().manual_seed(384)
    modules = dict(model.named_modules())
    from transformers.pytorch_utils import Conv1D

    def shape(n):
        w = modules[n].weight
        return tuple(w.t().shape) if isinstance(modules[n], Conv1D) else tuple(w.shape)

    factors = {n: (torch.rand(shape(n)[0], generator=g, dtype=torch.float64) + 0.05,
                   torch.rand(shape(n)[1], generator=g, dtype=torch.float64) + 0.05) for n in [head] + body}
    eta, gamma, damping = 0.7, 0.6, 0.3
    tv = _valuer(model, at.Fisher("kfac", factors), validation=val if target == "validation" else None,
                 lr=eta, causal_weight=gamma, stability_weight=0.0, target=target, precondition=True,
                 precondition_damping=damping).value(batch)
    P = {}
    for n, (fo, fi) in factors.items():
        po, pi = (fo + damping * fo.mean()).rsqrt(), (fi + damping * fi.mean()).rsqrt()
        P[n] = torch.outer(po, pi)
    U = target_gradients(model, val if target == "validation" else batch, [head] + body)
    head_grads, b, t = head_token_gradients(model, batch, head)
    credits = capture_credits(model, batch, body)
    for i in range(len(b)):
        bi, ti = int(b[i]), int(t[i])
        C = head_grads[i]
        ad, nd = eta * float((P[head] * C * U[head]).sum()), float((P[head] * C * C).sum()) ** 0.5
        ac, sq = 0.0, 0.0
        for name in body:
            a, gr = credits[name]
            Cl = torch.outer(gr[bi, ti], a[bi, ti])
            ac += eta * float((P[name] * Cl * U[name]).sum())
            sq += float((P[name] * Cl * Cl).sum())
        got = {k: float(v[bi, ti]) for k, v in tv.parts.items()}
        for key, ref in (("adaptation_direct", ad), ("adaptation_causal", ac), ("credit_norm_direct", nd),
                         ("credit_norm_causal", sq ** 0.5)):
            assert abs(got[key] - ref) <= 1e-6 * (1 + abs(ref)), (key, bi, ti, got[key], ref)


def test_precondition_needs_a_kfac_fisher():
    model = tiny_model("llama", seed=391)
    head, body = _names(model)
    diag = at.Fisher("diag", random_fisher(model, [head] + body, 392))
    with pytest.raises(ValueError, match="kfac"):
        _valuer(model, diag, precondition=True)
    with pytest.raises(ValueError, match="kfac"):
        _valuer(model, None, precondition=True)
