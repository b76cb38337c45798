"""Every TokenValues field against an independent float64 brute force, on model families beyond test_engine.py.

The brute force here shares no code with the engine or with tests/brute.py:
* U_l: the weight's own `.grad` of L_mean in a copy of the model where every tracked module owns its weight
  (a tied head is valued through its own use, DESIGN §3);
* direct: the head weight's gradient of each ℓ_t from its own backward;
* causal: Linear / Conv1D credits g_t a_tᵀ with g from an additive zero leaf on the output; Embedding credits
  as the true per-position weight gradient, from a zero perturbation of the weight at each position (so a
  scaled embedding (Gemma) and `padding_idx` are whatever F.embedding and the module make of them);
* stability: −[R(W − ηC) − R(W)] with R = ½⟨F, (W − W⁰)²⟩ and F built in full (kfac: f_out f_inᵀ);
* selection, normalize, the reference Fisher (DESIGN §5) recomputed by hand.
"""
from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as Fn
import transformers as tf
from torch import nn
from transformers.pytorch_utils import Conv1D

import alphatoken as at

from models import SPEC_RULE

V = 37
FIELDS = ("adaptation", "stability", "direct", "causal", "total")
_C = dict(vocab_size=V, hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=64)


def _build(family: str, layers: int, tie):
    kw = {} if tie is None else {"tie_word_embeddings": tie}
    c = dict(_C, num_hidden_layers=layers, **kw)
    no_drop = dict(hidden_dropout=0.0, attention_dropout=0.0)
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**c))
    if family == "phi":
        return tf.PhiForCausalLM(tf.PhiConfig(**c, partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0))
    if family == "phi3":  # fused qkv_proj / gate_up_proj, padding_idx 0
        return tf.Phi3ForCausalLM(tf.Phi3Config(**c, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    if family == "gpt_neox":
        c.pop("num_key_value_heads")
        return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**c, rotary_pct=0.5, **no_drop))
    if family == "opt":  # project_in / project_out, tied, padding_idx 1, fc layers on (B·T, d) rows
        return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=V, hidden_size=16, num_hidden_layers=layers, ffn_dim=24,
                                              num_attention_heads=4, max_position_embeddings=64,
                                              word_embed_proj_dim=12, dropout=0.0, attention_dropout=0.0,
                                              pad_token_id=1, **kw))
    if family == "falcon":  # alibi, sequential attention, biases; tied
        return tf.FalconForCausalLM(tf.FalconConfig(vocab_size=V, hidden_size=16, num_hidden_layers=layers,
                                                    num_attention_heads=4, alibi=True, multi_query=False,
                                                    parallel_attn=False, bias=True, **no_drop, **kw))
    if family == "bloom":
        return tf.BloomForCausalLM(tf.BloomConfig(vocab_size=V, hidden_size=16, n_layer=layers, n_head=4,
                                                  **no_drop, **kw))
    if family == "gptj":  # head with a bias
        return tf.GPTJForCausalLM(tf.GPTJConfig(vocab_size=V, n_embd=16, n_layer=layers, n_head=4, rotary_dim=2,
                                                n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                **kw))
    if family == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**c, head_dim=4))
    if family == "olmo2":
        return tf.Olmo2ForCausalLM(tf.Olmo2Config(**c, pad_token_id=1))
    if family == "stablelm":  # per-head q/k norms: a ModuleList inside each block
        return tf.StableLmForCausalLM(tf.StableLmConfig(**c, qk_layernorm=True, partial_rotary_factor=0.5,
                                                        **no_drop))
    if family == "cohere":  # logit_scale, tied
        return tf.CohereForCausalLM(tf.CohereConfig(**c, logit_scale=0.5, pad_token_id=0))
    if family == "granite":  # logits_scaling and the other multipliers
        return tf.GraniteForCausalLM(tf.GraniteConfig(**c, logits_scaling=2.0, embedding_multiplier=1.5,
                                                      residual_multiplier=0.7, attention_multiplier=0.3))
    if family == "gemma":  # scaled input embedding (× √d) with padding_idx 0, tied
        return tf.GemmaForCausalLM(tf.GemmaConfig(**c, head_dim=4, pad_token_id=0))
    if family == "mixtral":  # experts are 3-D parameters, not nn.Linear: values over attention and the head
        return tf.MixtralForCausalLM(tf.MixtralConfig(**c, num_local_experts=4, num_experts_per_tok=2,
                                                      experts_implementation="eager"))
    raise ValueError(family)


FAMILIES = ("mistral", "phi", "phi3", "gpt_neox", "opt", "falcon", "bloom", "gptj", "qwen3", "olmo2", "stablelm",
            "cohere", "granite", "gemma", "mixtral")


def tiny(family: str, seed: int, layers: int = 2, tie=None):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _build(family, layers, tie)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model.to(torch.float64).eval()


def batch_for(model, seed: int, pad: str, B: int = 3, T: int = 9):
    """Ragged prompts/responses, `pad`-side padding, and real tokens equal to the embedding's padding_idx."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    pad_idx = model.get_input_embeddings().padding_idx
    if pad_idx is not None:
        ids[:, 1] = pad_idx  # a prompt token
        ids[0, T - 2] = pad_idx  # a response token
    lengths = torch.randint(T - 3, T + 1, (B,), generator=g)
    lengths[0] = T
    out = {k: torch.zeros(B, T, dtype=torch.long) for k in ("input_ids", "attention_mask")}
    out["labels"] = torch.full((B, T), -100)
    for i in range(B):
        L = int(lengths[i])
        prompt = int(torch.randint(2, 4, (1,), generator=g))
        span = slice(T - L, T) if pad == "left" else slice(0, L)
        out["attention_mask"][i, span] = 1
        out["input_ids"][i, span] = ids[i, :L]
        lab = ids[i, :L].clone()
        lab[:prompt] = -100
        if L > 5:
            lab[prompt + 1] = -100  # a hole inside the response (multi-turn)
        out["labels"][i, span] = lab
    return out


# ------------------------------------------------------------------ the brute force
def _kind(m):
    return "linear" if isinstance(m, nn.Linear) else "conv1d" if isinstance(m, Conv1D) else \
        "embedding" if isinstance(m, nn.Embedding) else None


def _mat(m, w):
    return w if _kind(m) == "linear" else w.t()  # (d_out, d_in); an Embedding's W is weight.T (d, vocab)


def tracked(model, layers="all", embeddings=False):
    mods = dict(model.named_modules())
    head = model.get_output_embeddings()
    head_name = next(n for n, m in mods.items() if m is head)
    emb = model.get_input_embeddings() if embeddings else None
    if isinstance(layers, int):
        last = range(model.config.num_hidden_layers - layers, model.config.num_hidden_layers)
        keep = lambda n: any(re.search(rf"\.layers\.{i}\.|\.h\.{i}\.", n) for i in last)  # noqa: E731
    else:
        keep = lambda n: layers == "all" or re.search(layers, n) is not None  # noqa: E731
    body = [n for n, m in mods.items() if m is not head and (
        (_kind(m) == "embedding" and m is emb) or (_kind(m) in ("linear", "conv1d") and keep(n)))]
    return head_name, body


def _inputs(model, batch):
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    mask = batch["attention_mask"]
    if bool((mask[:, 0] == 0).any()) and not isinstance(model, tf.BloomForCausalLM):
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)  # a left-padded row as if unpadded
    return kw


def _nll(logits, labels):
    resp = labels != -100
    resp[:, 0] = False
    b, t = resp.nonzero(as_tuple=True)
    return -torch.log_softmax(logits[b, t - 1], -1).gather(1, labels[b, t, None])[:, 0], b, t


def _own_weights(model, names):
    c = copy.deepcopy(model)
    mods = dict(c.named_modules())
    for n in names:
        mods[n].weight = nn.Parameter(mods[n].weight.detach().clone())
    return c, mods


def credits(model, names, batch):
    """name -> per-position credit function (b, t) -> C (d_out, d_in), of L_sum; and the logits."""
    c, mods = _own_weights(model, names)
    zeros, inputs, perts, handles = {}, {}, {}, []
    plain = nn.Embedding.forward
    targets = {id(mods[n]): n for n in names if _kind(mods[n]) == "embedding"}

    def perturbed(self, ids):
        if id(self) not in targets:
            return plain(self, ids)
        P = torch.zeros(*ids.shape, *self.weight.shape, dtype=self.weight.dtype, requires_grad=True)
        perts[targets[id(self)]] = P
        return torch.stack([torch.stack([Fn.embedding(ids[i, j], self.weight + P[i, j], self.padding_idx)
                                         for j in range(ids.shape[1])]) for i in range(ids.shape[0])])

    for n in names:
        if _kind(mods[n]) != "embedding":
            def hook(mod, args, out, n=n):
                inputs[n] = args[0].detach()
                zeros[n] = torch.zeros_like(out, requires_grad=True)
                return out + zeros[n]
            handles.append(mods[n].register_forward_hook(hook))
    nn.Embedding.forward = perturbed
    try:
        logits = c(**_inputs(c, batch)).logits
    finally:
        nn.Embedding.forward = plain
        for h in handles:
            h.remove()
    keys = list(zeros) + list(perts)
    grads = torch.autograd.grad(_nll(logits, batch["labels"])[0].sum(), [zeros.get(k, perts.get(k)) for k in keys],
                                allow_unused=True)
    B, T = batch["input_ids"].shape
    out = {}
    for k, gr in zip(keys, grads):
        if k in perts:
            out[k] = lambda b, t, gr=gr: gr[b, t].t()
        else:
            gr = torch.zeros_like(zeros[k]) if gr is None else gr
            g3, a3 = gr.reshape(B, T, -1), inputs[k].reshape(B, T, -1)
            out[k] = lambda b, t, g3=g3, a3=a3: torch.outer(g3[b, t], a3[b, t])
    return out, logits.detach()


def target(model, names, batch):
    c, mods = _own_weights(model, names)
    nll = _nll(c(**_inputs(c, batch)).logits, batch["labels"])[0]
    grads = torch.autograd.grad(nll.mean(), [mods[n].weight for n in names], allow_unused=True)
    return {n: _mat(mods[n], torch.zeros_like(mods[n].weight) if g is None else g) for n, g in zip(names, grads)}


def brute_values(model, batch, names, eta, lam, gamma, fisher=None, reference=None, U=None, normalize=False):
    head, body = names[0], names[1:]
    mods = dict(model.named_modules())
    c, cmods = _own_weights(model, names)
    nll, b, t = _nll(c(**_inputs(c, batch)).logits, batch["labels"])
    head_grads = [_mat(cmods[head], torch.autograd.grad(nll[i], cmods[head].weight, retain_graph=True)[0])
                  for i in range(nll.numel())]
    body_credits = credits(model, body, batch)[0] if body else {}
    f = {k: torch.zeros(batch["labels"].shape, dtype=torch.float64) for k in ("ad", "sd", "ac", "sc")}

    def stability(C, n):
        if fisher is None:
            return 0.0
        F = torch.outer(*fisher[n]) if isinstance(fisher[n], tuple) else fisher[n]
        W = _mat(mods[n], mods[n].weight.detach())
        W0 = _mat(mods[n], reference[n])
        R = lambda X: 0.5 * (F * (X - W0) ** 2).sum()  # noqa: E731
        return -(R(W - eta * C) - R(W))

    for i in range(nll.numel()):
        bi, ti = int(b[i]), int(t[i])
        f["ad"][bi, ti] = 0.0 if U is None else eta * (head_grads[i] * U[head]).sum()
        f["sd"][bi, ti] = stability(head_grads[i], head)
        for n in body:
            C = body_credits[n](bi, ti)
            f["ac"][bi, ti] += 0.0 if U is None else eta * (C * U[n]).sum()
            f["sc"][bi, ti] += stability(C, n)
    if normalize:
        for d, c_ in (("ad", "ac"), ("sd", "sc")):
            rms = (f[d] + gamma * f[c_])[b, t].pow(2).mean().sqrt()
            if rms > 0:
                f[d], f[c_] = f[d] / rms, f[c_] / rms
    out = {"adaptation": f["ad"] + gamma * f["ac"], "stability": f["sd"] + gamma * f["sc"],
           "direct": f["ad"] + lam * f["sd"], "causal": f["ac"] + lam * f["sc"]}
    out["total"] = out["direct"] + gamma * out["causal"]
    return out


def brute_mask(total, labels, keep_ratio, selection, min_keep):
    resp = labels != -100
    resp[:, 0] = False
    pos = [tuple(p) for p in resp.nonzero().tolist()]
    order = sorted(pos, key=lambda p: (-float(total[p]), p))  # ties by position
    count = {r: sum(p[0] == r for p in pos) for r, _ in pos}
    rank, seen = {}, {}
    for p in order:
        rank[p] = seen.get(p[0], 0)
        seen[p[0]] = rank[p] + 1
    keep = {p for p in order if rank[p] < min(min_keep, count[p[0]])}
    if selection == "batch":
        for p in order:
            if len(keep) < math.ceil(keep_ratio * len(pos) - 1e-9):
                keep.add(p)
    else:
        keep |= {p for p in order if rank[p] < math.ceil(keep_ratio * count[p[0]] - 1e-9)}
    mask = torch.zeros(labels.shape, dtype=torch.bool)
    for p in keep:
        mask[p] = True
    return mask


def brute_fisher(model, batch, names, kind):
    """DESIGN §5, data labels: (1/N) Σ_s C_s² over head rows predicting response tokens and non-pad body rows."""
    cred, logits = credits(model, names, batch)
    _, b, t = _nll(logits, batch["labels"])
    head_rows = list(zip(b.tolist(), (t - 1).tolist()))
    body_rows = [tuple(p) for p in batch["attention_mask"].nonzero().tolist()]
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        rows = head_rows if mods[n] is model.get_output_embeddings() else body_rows
        if kind == "diag":
            out[n] = sum(cred[n](*p) ** 2 for p in rows) / len(head_rows)
            continue
        assert _kind(mods[n]) == "embedding", "the kfac brute force here is for embeddings"
        d_out, d_in = _mat(mods[n], mods[n].weight).shape
        f_out, f_in = torch.zeros(d_out, dtype=torch.float64), torch.zeros(d_in, dtype=torch.float64)
        for p in rows:  # a = one-hot of the token; g = the credit's column there
            x = int(batch["input_ids"][p])
            f_out += cred[n](*p)[:, x] ** 2
            f_in[x] += 1.0
        f_out, f_in = f_out / len(head_rows), f_in / len(head_rows)
        out[n] = (f_out, f_in)
    return out


def random_fisher(model, names, kind, seed):
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        d_out, d_in = _mat(mods[n], mods[n].weight).shape
        if kind == "diag":
            out[n] = torch.rand(d_out, d_in, generator=g, dtype=torch.float64) + 0.1
        else:
            out[n] = (torch.rand(d_out, generator=g, dtype=torch.float64) + 0.1,
                      torch.rand(d_in, generator=g, dtype=torch.float64) + 0.1)
    return out


def move_weights(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def assert_values(tv, want, labels, keep_ratio, selection, min_keep, rtol=1e-5):
    resp = labels != -100
    resp[:, 0] = False
    assert torch.equal(tv.response, resp)
    for key in FIELDS:
        got = getattr(tv, key).double()
        scale = want[key].abs().max().item() + 1e-12
        err = (got - want[key]).abs().max().item()
        assert err <= rtol * scale + 1e-9, f"{key}: max error {err:.3e} (scale {scale:.3e})"
        assert torch.all(got[~resp] == 0), f"{key} is non-zero outside the response"
    # the mask from the engine's own (float32) totals, so that float32 near-ties cannot flip it
    assert torch.equal(tv.mask, brute_mask(tv.total, labels, keep_ratio, selection, min_keep))


def valuer_for(model, fisher, validation=None, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return at.AlphaToken(model, at.AlphaTokenConfig(**{**SPEC_RULE, **cfg}), fisher=fisher, validation=validation)


# ------------------------------------------------------------------ tests
@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_field_with_embeddings_diag_drift_and_left_padding(family):
    """Batch target, diag Fisher, drifted weights, the input embedding tracked (Gemma's scale, padding_idx)."""
    seed = 1000 + FAMILIES.index(family)
    model = tiny(family, seed)
    pad = "right" if family == "bloom" else "left"  # float64 Bloom gives NaN on left-padded rows by itself
    batch = batch_for(model, seed + 1, pad)
    names = list(tracked(model, embeddings=True))
    names = [names[0]] + names[1]
    F = random_fisher(model, names, "diag", seed + 2)
    eta, lam, gamma = 0.7, 1.3, 0.6
    valuer = valuer_for(model, at.Fisher("diag", F), lr=eta, stability_weight=lam, causal_weight=gamma,
                        keep_ratio=0.5, track_embeddings=True)
    assert valuer.tracked_layer_names() == names
    reference = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in F}
    move_weights(model, seed + 3)
    tv = valuer.value(batch)
    want = brute_values(model, batch, names, eta, lam, gamma, fisher=F, reference=reference,
                        U=target(model, names, batch))
    assert_values(tv, want, batch["labels"], 0.5, "batch", 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_field_with_kfac_validation_normalize_and_last_blocks(family):
    """Validation target, kfac Fisher with drift, normalize, the last block only, sequence selection, the
    other tie setting than the family's default."""
    seed = 2000 + FAMILIES.index(family)
    default_tied = tiny(family, seed, layers=1).config.tie_word_embeddings
    model = tiny(family, seed, layers=3, tie=not default_tied)
    batch = batch_for(model, seed + 1, "right")
    val = batch_for(model, seed + 4, "right", B=2, T=8)
    head, body = tracked(model, layers=1, embeddings=True)
    names = [head] + body
    assert any(".2." in n for n in body) and not any(".1." in n for n in body)
    F = random_fisher(model, names, "kfac", seed + 2)
    eta, lam, gamma = 0.4, 0.8, 1.5
    valuer = valuer_for(model, at.Fisher("kfac", F), validation=val, lr=eta, stability_weight=lam,
                        causal_weight=gamma, target="validation", normalize=True, tracked_layers=1,
                        track_embeddings=True, selection="sequence", keep_ratio=0.4, min_keep_per_sequence=2)
    assert valuer.tracked_layer_names() == names
    reference = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in F}
    move_weights(model, seed + 3)
    tv = valuer.value(batch)
    want = brute_values(model, batch, names, eta, lam, gamma, fisher=F, reference=reference,
                        U=target(model, names, val), normalize=True)
    assert_values(tv, want, batch["labels"], 0.4, "sequence", 2)


@pytest.mark.parametrize("family", ["phi3", "opt", "gemma", "cohere", "falcon"])
def test_estimated_fisher_matches_brute_force_with_embeddings(family):
    seed = 3000 + FAMILIES.index(family)
    model = tiny(family, seed)
    batch = batch_for(model, seed + 1, "left")
    head, body = tracked(model, embeddings=True)
    names = [head] + body
    diag = at.estimate_fisher(model, [batch], kind="diag", labels="data", track_embeddings=True)
    kfac = at.estimate_fisher(model, [batch], kind="kfac", labels="data", track_embeddings=True)
    want = brute_fisher(model, batch, names, "diag")
    mods = dict(model.named_modules())
    (emb,) = [n for n in names if _kind(mods[n]) == "embedding"]
    for n in names:
        torch.testing.assert_close(diag[n].double(), want[n], rtol=1e-10, atol=1e-12, msg=n)
    # kfac of the embedding: f_out = (1/N) Σ g², f_in = (1/N) token counts over non-pad positions
    want_kfac = brute_fisher(model, batch, [emb], "kfac")
    torch.testing.assert_close(kfac[emb][0].double(), want_kfac[emb][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kfac[emb][1].double(), want_kfac[emb][1], rtol=1e-10, atol=1e-12)
    # values with the estimated Fisher at θ₀ (Fisher-norm term only) match too
    valuer = valuer_for(model, diag, track_embeddings=True, stability_weight=1.0)
    tv = valuer.value(batch)
    F = {n: diag[n].double() for n in names}
    ref = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in F}
    want_v = brute_values(model, batch, names, 1.0, 1.0, 1.0, fisher=F, reference=ref, U=target(model, names, batch))
    assert_values(tv, want_v, batch["labels"], 0.6, "batch", 1)


def test_last_k_blocks_ignore_module_lists_inside_blocks():
    model = tiny("stablelm", 4000, layers=2)  # 4 per-head norms per block: a longer ModuleList than the blocks
    names = valuer_for(model, None, tracked_layers=1).tracked_layer_names()
    assert names[0] == "lm_head" and len(names) == 1 + 7
    assert all(n.startswith("model.layers.1.") for n in names[1:])


def test_an_embedding_that_transforms_its_lookup_is_named():
    model = tiny("mistral", 4001)

    class NormedEmbedding(nn.Embedding):
        def forward(self, ids):
            return torch.tanh(super().forward(ids))

    old = model.get_input_embeddings()
    new = NormedEmbedding(old.num_embeddings, old.embedding_dim, dtype=torch.float64)
    model.set_input_embeddings(new)
    with pytest.raises(ValueError, match="unsupported tracked module.*NormedEmbedding"):
        valuer_for(model, None, track_embeddings=True)
    valuer_for(model, None)  # not tracked: fine


def test_weights_outside_every_trackable_module_are_named_in_a_warning():
    """Fused mixture-of-experts weights (3-D, not nn.Linear) and a router that is not an nn.Linear are not
    valued: one warning says so, by name. A dense model gets no such warning."""
    moe = tiny("mixtral", 4002)
    with pytest.warns(UserWarning, match=r"6 trainable weights .*'model\.layers\.0\.mlp\.gate\.weight'"):
        at.AlphaToken(moe, at.AlphaTokenConfig(), fisher=None).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*fisher=None.*")
        warnings.filterwarnings("ignore", message=".*no validation batch.*")
        at.AlphaToken(tiny("mistral", 4003), at.AlphaTokenConfig(), fisher=None).close()
