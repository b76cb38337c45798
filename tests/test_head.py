"""The chunked LM head (kernels/chunked_head.py, alphatoken/head.py, alphatoken/head_loss.py) against float64
brute force: the row kernel (Triton in the interpreter, fp32) and its reference, the chunk loop's gradients, the
training loss Function, and the engine's fused step (values, loss, gradients; soft-capping and logit scaling;
the unfused fallback for a head it cannot fuse; no (tokens × vocab) tensor saved for the backward)."""
from __future__ import annotations

import copy
import math
import warnings
import zlib

import pytest
import torch

import alphatoken as at
from alphatoken import kernels as K
from alphatoken.head import HeadTransform, fused_chunks, head_values
from alphatoken.head_loss import chunked_head_loss

from models import random_batch, tiny_model
from test_engine_families import tiny as family_model, batch_for

TRANSFORMS = {"identity": HeadTransform(), "scaled": HeadTransform(multiply=0.7),
              "softcap": HeadTransform(divide=1.3, softcap=2.5)}


def _brute_rows(z, targets, weights, transform):
    """ℓ and g = ∂(Σ w ℓ)/∂z by autograd in float64."""
    z = z.detach().double().requires_grad_(True)
    logp = torch.log_softmax(transform(z), dim=1)
    nll = -logp.gather(1, targets[:, None])[:, 0]
    (g,) = torch.autograd.grad((weights.double() * nll).sum(), z)
    return nll.detach(), g


@pytest.mark.parametrize("shape", [(7, 77), (33, 300)], ids=["odd", "wider"])
@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_head_rows_match_float64_autograd(shape, name, backend):
    n, V = shape
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape}-{name}".encode()) % 10_000)  # str hash() is salted per process
    z = 3 * torch.randn(n, V, generator=gen)
    targets = torch.randint(0, V, (n,), generator=gen)
    weights = torch.rand(n, generator=gen) + 0.5
    tr = TRANSFORMS[name]
    want_nll, want_g = _brute_rows(z, targets, weights, tr)
    K.reset_launch_counts()
    with K.use_backend(backend):
        nll, g = K.head_rows(z.clone(), targets, weights, tr.scale, tr.softcap)
    if backend == "reference":  # exactness of the reference itself in float64
        nll64, g64 = K.head_rows_reference(z.double(), targets, weights.double(), tr.scale, tr.softcap)
        torch.testing.assert_close(nll64, want_nll, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g64, want_g, rtol=1e-11, atol=1e-13)
    assert (K.launch_counts().get("head_rows", 0) == 1) == (backend == "triton")
    torch.testing.assert_close(nll.double(), want_nll, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(g.double(), want_g, rtol=2e-5, atol=2e-6)
    # the nll-only pass
    with K.use_backend(backend):
        nll_only, none = K.head_rows(z.clone(), targets, weights, tr.scale, tr.softcap, with_grad=False)
    assert none is None
    torch.testing.assert_close(nll_only.double(), want_nll, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_chunked_grads_and_loss_function_match_brute_force_float64(name):
    tr = TRANSFORMS[name]
    gen = torch.Generator().manual_seed(7)
    n, d, V = 23, 5, 41
    a = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, d, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (n,), generator=gen)
    nll = -torch.log_softmax(tr(a @ W.T + b), 1).gather(1, y[:, None])[:, 0]
    want = nll.sum() / 17.0
    want_grads = torch.autograd.grad(want, (a, W, b), retain_graph=True)
    (rows_grad,) = torch.autograd.grad(nll.sum(), a, retain_graph=True)  # ∂ℓ_t/∂a_t, the seed rows g_t W
    for chunk in (1, 4, 100):  # one row, ragged last chunk, one chunk
        for given_nll, given_rows in ((None, None), (nll.detach(), None), (nll.detach(), rows_grad)):
            loss = chunked_head_loss(a, W, b, y, torch.tensor(17.0, dtype=torch.float64), tr, nll=given_nll,
                                     chunk_rows=chunk, grad_rows=given_rows)
            assert math.isclose(loss.item(), want.item(), rel_tol=1e-12)
            got = torch.autograd.grad(loss, (a, W, b))
            for g_got, g_want in zip(got, want_grads):
                torch.testing.assert_close(g_got, g_want, rtol=1e-11, atol=1e-13)
    assert torch.autograd.gradcheck(
        lambda a_, W_, b_: chunked_head_loss(a_, W_, b_, y[:6], torch.tensor(3.0, dtype=torch.float64), tr, chunk_rows=5),
        (a[:6].detach().requires_grad_(), W.detach().requires_grad_(), b.detach().requires_grad_()))


def test_head_values_match_explicit_credits_float64():
    """Batch target (U accumulated over chunks, second pass), diag Fisher with drift, kfac with drift, the seed."""
    gen = torch.Generator().manual_seed(3)
    n, d, V, eta = 19, 6, 29, 0.7
    a = torch.randn(n, d, generator=gen, dtype=torch.float64)
    W = torch.randn(V, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, V, (n,), generator=gen)
    w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    tr = HeadTransform(softcap=3.0)
    F = torch.rand(V, d, generator=gen, dtype=torch.float64)
    delta = 0.1 * torch.randn(V, d, generator=gen, dtype=torch.float64)
    f_out, f_in = torch.rand(V, generator=gen, dtype=torch.float64), torch.rand(d, generator=gen, dtype=torch.float64)
    _, g = _brute_rows(a @ W.T, y, w, tr)
    U = g.T @ a / n
    C = [torch.outer(g[i], a[i]) for i in range(n)]
    cases = [(fisher, Ff, drift) for fisher, Ff in ((("diag", F), F), (("kfac", f_out, f_in), torch.outer(f_out, f_in)))
             for drift in ({"delta": delta}, {"reference": (W, W - delta)})]  # Δ given, or formed tile by tile
    for fisher, Ff, drift in cases:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("alphatoken.head.DRIFT_BLOCK_ELEMENTS", 4 * d)  # 4 vocabulary rows per tile: ragged last
            hv = head_values(a, W, fused_chunks(a, W, None, y, w, tr, chunk_rows=4), eta, batch_scale=1.0 / n,
                             fisher=fisher, **drift)
        want_a = torch.stack([eta * (c * U).sum() for c in C])
        R = lambda X: 0.5 * (Ff * (X - (W - delta)) ** 2).sum()  # noqa: E731
        want_s = torch.stack([-(R(W - eta * c) - R(W)) for c in C])
        torch.testing.assert_close(hv.adaptation, want_a, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(hv.stability, want_s, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(hv.seed, g @ W, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(hv.nll, _brute_rows(a @ W.T, y, w, tr)[0], rtol=1e-12, atol=1e-13)


def _masked_loss_grads(model, batch, labels):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    resp = labels != -100
    resp[:, 0] = False
    b, t = resp.nonzero(as_tuple=True)
    nll = -torch.log_softmax(logits[b, t - 1], -1).gather(1, labels[b, t, None])[:, 0]
    loss = nll.mean()
    return loss, torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)


def _fused_and_masked_gradients(model, batch, keep_ratio):
    """value_and_loss through the fused head, checked to be fused and to give the plain masked loss; returns
    (its gradient, the plain masked loss's gradient) per trainable parameter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        valuer = at.AlphaToken(model, at.AlphaTokenConfig(keep_ratio=keep_ratio), fisher=None)
    loss = valuer.value_and_loss(batch)
    assert valuer.head_fusable is True
    got = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    want_loss, want = _masked_loss_grads(model, batch, valuer.last_values.apply(batch["labels"]))
    assert math.isclose(loss.item(), want_loss.item(), rel_tol=1e-11)
    return zip(got, want)


@pytest.mark.parametrize("family", ["gemma2", "gpt2", "qwen2-tied"])
def test_fused_training_loss_gradients_equal_the_masked_loss_float64(family):
    """value_and_loss through the fused head: loss and every parameter's gradient equal the plain masked loss on
    the masked labels (soft-capped Gemma-2, GPT-2, a tied head)."""
    name, tie = family.split("-")[0], family.endswith("tied")
    model = tiny_model(name, seed=5, tie=tie)
    batch = random_batch(6)
    for g_got, g_want in _fused_and_masked_gradients(model, batch, keep_ratio=0.5):
        if g_want is None:
            assert g_got is None or torch.all(g_got == 0)
        else:
            torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", ["cohere", "granite", "gptj"])
def test_logit_scaling_and_head_bias_are_fused_and_exact(family):
    """Cohere (logit_scale), Granite (logits_scaling), GPT-J (a head bias): fused, loss gradients exact."""
    model = family_model(family, 17)
    batch = batch_for(model, 18, "right")
    for g_got, g_want in _fused_and_masked_gradients(model, batch, keep_ratio=0.6):
        if g_want is not None:
            torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


def test_an_unknown_post_head_map_falls_back_by_name_and_stays_exact():
    """A hook that shifts the head's output (not W a + b): the head runs unfused, with a warning that says so;
    values equal those of a valuer on an identical model whose head is changed the same way in its weights."""
    model = tiny_model("llama", seed=8)
    batch = random_batch(9)
    shifted = copy.deepcopy(model)
    head = shifted.get_output_embeddings()
    head.register_forward_hook(lambda m, args, out: out + 0.3 * torch.arange(out.shape[-1], dtype=out.dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        valuer = at.AlphaToken(shifted, at.AlphaTokenConfig(paths="direct"), fisher=None)
    with pytest.warns(UserWarning, match="runs unfused, on the response rows only"):
        tv = valuer.value(batch)
    assert valuer.head_fusable is False
    # the same map as a bias: fusable, and the direct values (which read only g and a) agree
    biased = copy.deepcopy(model)
    lin = biased.get_output_embeddings()
    lin.bias = torch.nn.Parameter(0.3 * torch.arange(lin.weight.shape[0], dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = at.AlphaToken(biased, at.AlphaTokenConfig(paths="direct"), fisher=None)
    want = ref.value(batch)
    assert ref.head_fusable is True
    torch.testing.assert_close(tv.direct, want.direct, rtol=1e-10, atol=1e-12)
    assert torch.equal(tv.mask, want.mask)


def test_no_tokens_by_vocab_tensor_is_saved_for_the_training_backward():
    """With a vocabulary far wider than the model, value_and_loss saves nothing of size (response rows × V)
    for the backward: the head's loss recomputes its chunks."""
    V = 4096
    model = tiny_model("llama", seed=12, vocab=V)
    batch = random_batch(13, vocab=V, B=8, T=40)
    n = int((batch["labels"][:, 1:] != -100).sum())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        valuer = at.AlphaToken(model, at.AlphaTokenConfig(), fisher=None)
    valuer.value(batch)  # the first step checks the transform on the model's own logits
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = valuer.value_and_loss(batch)
    loss.backward()
    assert sizes and max(sizes) < n * V // 4, f"a saved tensor of {max(sizes)} elements (n·V = {n * V})"
    assert n * V // 4 > V * 16  # the head weight itself (V × d) is below the bound


# Where a step may read the device (selection truly needs these): the response rows, the one finiteness flag,
# the selection itself, the kept rows of the loss, the left-padding test of the inputs, the normalization.
SYNC_ALLOWED = {"_run", "_raise_if_nonfinite", "select_tokens", "protected_tokens", "value_and_loss",
                "model_inputs", "_combine", "_rms"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync debug mode needs a CUDA device (none here)")
def test_a_step_reads_the_device_only_where_selection_needs_it():
    """Under torch.cuda.set_sync_debug_mode, every synchronizing call of a second value_and_loss step (after
    the first step's fused-head check) happens inside an allow-listed function; each one is reported with its
    stack. The debug mode is "warn" with every warning turned into a recorded failure, which is "error" with an
    allow-list: "error" itself would stop at the first allowed read."""
    import traceback

    model = tiny_model("llama", seed=31, vocab=512, dtype=torch.float32).cuda()
    batch = {k: v.cuda() for k, v in random_batch(32, vocab=512, B=4, T=24).items()}
    fisher = at.Fisher("kfac", {n: (torch.rand(*s[:1]) + 0.1, torch.rand(s[1]) + 0.1) for n, s in (
        (layer.name, layer.shape) for layer in at.AlphaToken(model, at.AlphaTokenConfig(), fisher=None).layers)})
    valuer = at.AlphaToken(model, at.AlphaTokenConfig(), fisher=fisher)
    valuer.value_and_loss(batch).backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)  # the drift is live
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    bad = []
    previous = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return previous(message, category, filename, lineno, file, line)
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if any(k in f.filename for k in ("/alphatoken/", "/kernels/", "/transformers/"))]
        innermost = ours[-1] if ours else None  # the code that asked: ours, or the model's own forward
        if innermost is None or ("/transformers/" not in innermost.filename and innermost.name not in SYNC_ALLOWED):
            bad.append("".join(traceback.format_list(stack[-6:])))

    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            valuer.value_and_loss(batch).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = previous
    assert not bad, f"{len(bad)} host syncs outside the allow-list; first at:\n{bad[0]}"
