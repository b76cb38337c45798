"""The retention batch (DESIGN §3.8): U = ∇L_val + μ·∇L_ret, against float64 brute force; `own_answers` against a
greedy decoding written out token by token."""
from __future__ import annotations

import warnings

import pytest
import torch

import alphatoken as at
from alphatoken.credits import Direction, add_directions, direction_square_norm
from alphatoken.retention import own_answers

from brute import brute_values, target_gradients
from models import FAMILIES, SPEC_RULE, random_batch, random_fisher, tiny_model
from test_engine import assert_fields, names_of


def _valuer(model, **kw):
    cfg = at.AlphaTokenConfig(**{**SPEC_RULE, "target": "validation", "stability_weight": 0.0,
                                 **kw.pop("cfg", {})})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return at.AlphaToken(model, cfg, **kw)


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost", "materialized"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_retention_adds_its_weighted_gradient_to_the_validation_target(family, ghost, monkeypatch):
    from alphatoken import kernels as K

    monkeypatch.setattr(K, "use_ghost", lambda *args: ghost)
    model = tiny_model(family, seed=301)
    batch, val, ret = random_batch(302), random_batch(303, B=2), random_batch(304, B=4, T=7)
    mu = 0.7
    head, body = names_of(model)
    tv = _valuer(model, validation=val, retention=ret, cfg={"retention_weight": mu}).value(batch)
    u_val = target_gradients(model, val, [head] + body)
    u_ret = target_gradients(model, ret, [head] + body)
    want = brute_values(model, batch, head, body, target={n: u_val[n] + mu * u_ret[n] for n in u_val})
    assert_fields(tv, want, tv.response)
    alone = brute_values(model, batch, head, body, target=u_val)
    assert (tv.adaptation - alone["adaptation"]).abs().max() > 1e-6  # the retention part is not negligible here


def test_retention_with_stability_and_the_library_rule_matches_brute_force_parts():
    model = tiny_model("llama", seed=305)
    batch, val, ret = random_batch(306), random_batch(307, B=2), random_batch(308, B=3)
    head, body = names_of(model)
    tensors = random_fisher(model, [head] + body, seed=309)
    fisher = at.Fisher("diag", tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        valuer = at.AlphaToken(model, at.AlphaTokenConfig(retention_weight=2.0), fisher=fisher, validation=val,
                               retention=ret)
    tv = valuer.value(batch)
    u_val, u_ret = (target_gradients(model, x, [head] + body) for x in (val, ret))
    want = brute_values(model, batch, head, body, target={n: u_val[n] + 2.0 * u_ret[n] for n in u_val},
                        fisher=tensors)
    for objective in ("adaptation", "stability"):  # the raw parts the library's rule combines (γ = 1)
        got = (tv.parts[f"{objective}_direct"] + tv.parts[f"{objective}_causal"]).double()
        scale = want[objective].abs().max().item()
        assert (got - want[objective]).abs().max().item() <= 2e-5 * scale, objective


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost", "materialized"])
def test_normalized_retention_weighs_it_by_the_ratio_of_the_gradient_norms(ghost, monkeypatch):
    from alphatoken import kernels as K

    monkeypatch.setattr(K, "use_ghost", lambda *args: ghost)
    model = tiny_model("gpt2", seed=331)
    batch, val, ret = random_batch(332), random_batch(333, B=2), random_batch(334, B=3, T=6)
    head, body = names_of(model)
    valuer = _valuer(model, validation=val, retention=ret, cfg={"retention_weight": 0.4, "retention_normalize": True})
    tv = valuer.value(batch)
    u_val, u_ret = (target_gradients(model, x, [head] + body) for x in (val, ret))
    norm = lambda u: sum(float(v.double().square().sum()) for v in u.values()) ** 0.5
    factor = 0.4 * norm(u_val) / norm(u_ret)
    assert valuer.retention_factor == pytest.approx(factor, rel=1e-9)
    assert abs(factor - 0.4) > 0.05  # the norms differ, so normalizing changes U
    want = brute_values(model, batch, head, body, target={n: u_val[n] + factor * u_ret[n] for n in u_val})
    assert_fields(tv, want, tv.response)


@pytest.mark.parametrize("kind", ["factors", "matrix"])
def test_direction_square_norm_is_the_frobenius_norm(kind):
    g = torch.Generator().manual_seed(335)
    a, go = torch.randn(2100, 5, generator=g, dtype=torch.float64), torch.randn(2100, 3, generator=g, dtype=torch.float64)
    d = Direction(a_ref=a, g_ref=go, scale=0.3) if kind == "factors" else Direction(matrix=go.T @ a, scale=0.3)
    want = (0.3 * go.T @ a).square().sum()
    torch.testing.assert_close(direction_square_norm(d), want, rtol=1e-12, atol=0)


def test_zero_weight_is_the_validation_target_alone():
    model = tiny_model("qwen2", seed=311)
    batch, val, ret = random_batch(312), random_batch(313, B=2), random_batch(314, B=2)
    with_ret = _valuer(model, validation=val, retention=ret, cfg={"retention_weight": 0.0}).value(batch)
    alone = _valuer(model, validation=val).value(batch)
    torch.testing.assert_close(with_ret.adaptation, alone.adaptation, rtol=1e-12, atol=1e-12)


def test_retention_batches_cycle_with_the_validation_refresh():
    model = tiny_model("llama", seed=315)
    batch, val = random_batch(316), random_batch(317, B=2)
    rets = [random_batch(318, B=2), random_batch(319, B=2)]
    valuer = _valuer(model, validation=val, retention=rets)
    runs = [valuer.value(batch).adaptation for _ in range(3)]
    torch.testing.assert_close(runs[0], runs[2])  # the cycle came back to the first retention batch
    assert (runs[1] - runs[0]).abs().max() > 1e-6


@pytest.mark.parametrize("kind", ["factors+factors", "factors+matrix", "matrix+matrix"])
def test_add_directions_is_exact(kind):
    g = torch.Generator().manual_seed(320)
    a1, g1 = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    a2, g2 = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    first = Direction(a_ref=a1, g_ref=g1, scale=0.2) if kind != "matrix+matrix" else Direction(matrix=g1.T @ a1,
                                                                                                scale=0.2)
    second = Direction(a_ref=a2, g_ref=g2, scale=0.3) if kind == "factors+factors" else Direction(matrix=g2.T @ a2,
                                                                                                   scale=0.3)
    total = add_directions(first, second, 1.5)
    dense = total.matrix * total.scale if total.matrix is not None else (total.g_ref.T @ total.a_ref) * total.scale
    torch.testing.assert_close(dense, 0.2 * g1.T @ a1 + 1.5 * 0.3 * g2.T @ a2, rtol=1e-12, atol=1e-12)


def test_retention_needs_the_validation_target():
    model = tiny_model("llama", seed=321)
    ret = random_batch(322, B=2)
    for cfg, kw in ((at.AlphaTokenConfig(), {}), (at.AlphaTokenConfig(target="batch"), {}),
                    (at.AlphaTokenConfig(target="none"), {})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match="retention= adds to the validation target"):
                at.AlphaToken(model, cfg, retention=ret, **kw)
    empty = {**ret, "labels": torch.full_like(ret["labels"], -100)}
    valuer = _valuer(model, validation=random_batch(323, B=2), retention=empty)
    with pytest.raises(ValueError, match="the retention batch has no response tokens"):
        valuer.value(random_batch(324))
    with pytest.raises(ValueError, match="retention is empty"):
        _valuer(model, validation=random_batch(323, B=2), retention=[])
    with pytest.raises(ValueError, match="retention_weight"):
        at.AlphaTokenConfig(retention_weight=-1.0)
    with pytest.raises((TypeError, ValueError), match="retention_normalize"):
        at.AlphaTokenConfig(retention_normalize="yes")


class _CharTokenizer:
    """Characters a–z and space as ids 3–29; 1 is the end of sequence, 0 padding; no chat template."""

    eos_token_id, pad_token_id, chat_template = 1, 0, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (26 if c == " " else ord(c) - ord("a")) for c in text.lower()
                              if c == " " or c.isalpha()]}


def _greedy(model, ids, steps, eos):
    out = []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] == eos:
            break
    return out


@pytest.mark.parametrize("family", FAMILIES[:2])
def test_own_answers_are_the_models_greedy_answers(family):
    model = tiny_model(family, seed=330, vocab=37)
    tok = _CharTokenizer()
    prompts = ["name a fruit", "why is the sky blue", "a b", "what is two plus two"]
    with torch.no_grad():  # the end of sequence wins where the first prompt's 3rd answer token would: some end
        k = _greedy(model, tok(prompts[0] + "\n")["input_ids"], 3, tok.eos_token_id)[-1]
        head = model.get_output_embeddings().weight
        head[1] = 2.0 * head[k]
    batch = own_answers(model, tok, prompts, max_new_tokens=5, batch_size=3)
    model.train()
    ended = []
    for b, prompt in enumerate(prompts):
        prefix = tok(prompt + "\n")["input_ids"]
        answer = _greedy(model, prefix, 5, tok.eos_token_id)
        n = len(prefix) + len(answer)
        assert batch["input_ids"][b, :n].tolist() == prefix + answer
        assert batch["labels"][b, :n].tolist() == [-100] * len(prefix) + answer
        assert batch["attention_mask"][b].sum() == n and (batch["labels"][b, n:] == -100).all()
        ended.append(answer[-1] == tok.eos_token_id)
    assert any(ended) and not all(ended), ended  # answers that ended (eos labelled) and answers cut short
    assert model.training  # restored
    with pytest.raises(ValueError, match="at least one prompt"):
        own_answers(model, tok, [])
