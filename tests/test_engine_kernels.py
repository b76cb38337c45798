"""The engine through the kernels it ships: float32 models whose every kernel call runs
the Triton kernels (in Triton's interpreter on CPU, compiled on CUDA), against the float64 brute force of
tests/brute.py on a float64 copy of the same weights.

The float64 engine tests never reach a Triton kernel (the gate answers float64 with the reference), so the
seams between the engine and the kernels are checked here: the mixed lists of U and F⊙Δ in one
`bilinear_fisher_norm` launch, the `matched()` casts, Conv1D's transposed views, the kfac drift through
`bilinear`, and the ghost form of U. Shapes are tiny: the interpreter is slow.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import alphatoken as at
from alphatoken import kernels as K
from alphatoken.credits import Direction, linear_values
from alphatoken.layers import discover_layers

from brute import brute_values
from kernel_helpers import brute_bilinear, brute_fisher
from models import SPEC_RULE, move_weights, random_batch, random_fisher, tiny_model

FIELDS = ("adaptation", "stability", "direct", "causal", "total")
interpreter = pytest.mark.skipif(torch.cuda.is_available() or not K.interpreter_enabled(),
                                 reason="needs TRITON_INTERPRET=1 on a machine without CUDA (tests/conftest.py)")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for compiled Triton")


def _case(family: str, kind: str, seed: int, dtype: torch.dtype, device: str):
    """A model in `dtype` on `device`, its float64 twin with the same weights, θ₀, Fisher, moved weights."""
    model = tiny_model(family, seed=seed, dtype=torch.float32, layers=1)
    names = [layer.name for layer in discover_layers(model)]
    diag = random_fisher(model, names, seed + 1)
    if kind == "kfac":
        g = torch.Generator().manual_seed(seed + 2)
        factors = {n: (torch.rand(f.shape[0], generator=g, dtype=torch.float64) + 0.1,
                       torch.rand(f.shape[1], generator=g, dtype=torch.float64) + 0.1) for n, f in diag.items()}
        fisher = at.Fisher("kfac", {n: (fo.float(), fi.float()) for n, (fo, fi) in factors.items()})
        full = {n: torch.outer(fo.float().double(), fi.float().double()) for n, (fo, fi) in factors.items()}
    else:
        fisher = at.Fisher("diag", {n: f.float() for n, f in diag.items()})
        full = {n: f.float().double() for n, f in diag.items()}
    model = model.to(device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        valuer = at.AlphaToken(model, at.AlphaTokenConfig(**{**SPEC_RULE, "lr": 0.7, "stability_weight": 1.3, "causal_weight": 0.6}),
                               fisher=fisher)
    modules = dict(model.named_modules())
    theta0 = {n: modules[n].weight.detach().to("cpu", torch.float64).clone() for n in names}
    with torch.no_grad():  # move the weights in the model's own dtype
        for p in model.parameters():
            if p.dim() == 2:
                noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 3))
                p.add_((0.05 * noise).to(device=device, dtype=dtype))
    twin = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    return model, twin, valuer, names, full, theta0


def _check(tv, want, rtol):
    for key in FIELDS:
        got = getattr(tv, key).detach().to("cpu", torch.float64)
        scale = want[key].abs().max().item()
        err = (got - want[key]).abs().max().item()
        assert err <= rtol * scale, f"{key}: max error {err:.3e} > {rtol:g} of scale {scale:.3e}"
        assert torch.all(got[~tv.response.cpu()] == 0), f"{key} is non-zero outside the response"


@interpreter
@pytest.mark.parametrize("family,kind,ghost", [("gpt2", "diag", False), ("llama", "diag", True),
                                               ("gpt2", "kfac", True), ("llama", "kfac", False)],
                         ids=["gpt2-conv1d-diag", "llama-diag-ghost", "gpt2-conv1d-kfac-ghost", "llama-kfac"])
def test_float32_engine_through_the_interpreted_kernels_matches_float64_brute_force(family, kind, ghost, monkeypatch):
    """Drifted weights, so the diag case launches U and F⊙Δ as one mixed list next to the Fisher norm, and the
    kfac case runs its drift through `bilinear`; GPT-2's Conv1D hands the kernels transposed views."""
    monkeypatch.setattr(K, "use_ghost", lambda *args: ghost)
    seed = {"gpt2": 410, "llama": 420}[family] + (5 if kind == "kfac" else 0)
    model, twin, valuer, names, full, theta0 = _case(family, kind, seed, torch.float32, "cpu")
    batch = random_batch(seed + 4, B=2, T=8)
    K.reset_launch_counts()
    tv = valuer.value(batch)
    counts = K.launch_counts()
    # every body layer's forms ran in a Triton kernel; the head's run in the fused head's row kernel
    assert counts.get("bilinear", 0) >= len(names) - 1 and counts.get("head_rows", 0) >= 1, counts
    if ghost:
        assert counts.get("ghost_dot", 0) >= len(names) - 1, counts
    want = brute_values(twin, batch, names[0], names[1:], 0.7, 1.3, 0.6, fisher=full, reference=theta0)
    drift_free = brute_values(twin, batch, names[0], names[1:], 0.7, 1.3, 0.6, fisher=full, reference=None)
    assert (want["stability"] - drift_free["stability"]).abs().max() > 1e-2 * want["stability"].abs().max()
    _check(tv, want, rtol=1e-4)


def test_float64_reaches_the_kernels_launchers_and_the_gate_answers_it(monkeypatch):
    """One dispatcher: the engine hands every dtype to the kernels' launchers (float64 included), and the gate
    sends float64 to the reference (no Triton launch), instead of a second float64 path in the engine."""
    seen = []
    for name in ("bilinear", "fisher_norm", "bilinear_fisher_norm", "ghost_dot"):
        def spy(*args, _real=getattr(K, name), _name=name, **kw):
            seen.append((_name, args[0].dtype))
            return _real(*args, **kw)
        monkeypatch.setattr(K, name, spy)
    monkeypatch.setattr(K, "use_ghost", lambda *args: True)
    model = tiny_model("gpt2", seed=460, layers=1)
    names = [layer.name for layer in discover_layers(model)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        valuer = at.AlphaToken(model, at.AlphaTokenConfig(**SPEC_RULE), fisher=at.Fisher("diag", random_fisher(model, names, 461)))
    move_weights(model, 462)
    K.reset_launch_counts()
    valuer.value(random_batch(463, B=2, T=8))
    assert K.launch_counts() == {}
    assert {op for op, _ in seen} == {"bilinear_fisher_norm", "ghost_dot"}, seen
    # the body layers' launchers (the head's values come from the fused head, alphatoken/head.py)
    assert all(dtype == torch.float64 for _, dtype in seen) and len(seen) >= 2 * (len(names) - 1)


@interpreter
def test_matched_casts_mixed_precision_rows_before_the_interpreted_kernels():
    """Autocast hands a layer bf16 activations and float32 output-gradients (or the reverse): `matched()` casts
    both to float32 and the kernels see one dtype; the result equals the float64 brute force of the cast rows."""
    gen = torch.Generator().manual_seed(430)
    N, d_in, d_out, V = 19, 11, 7, 5
    a = torch.randn(N, d_in, generator=gen).bfloat16()
    g = torch.randn(N, d_out, generator=gen)
    a_ref = torch.randn(V, d_in, generator=gen)
    g_ref = torch.randn(V, d_out, generator=gen).bfloat16()
    F = torch.rand(d_out, d_in, generator=gen) + 0.1
    W = torch.randn(d_in, d_out, generator=gen)  # Conv1D storage (d_in, d_out): Δ is its transposed view
    delta = W.T
    eta, scale = 0.3, 0.25
    a64, g64 = a.double(), g.double()
    U64 = g_ref.double().T @ a_ref.double()  # the ghost form's G'ᵀA' from the matched (float32) rows
    for ghost in (True, False):  # U as bf16/float32 factors (ghost_dot), or materialized in float32
        direction = Direction(a_ref=a_ref, g_ref=g_ref, scale=scale) if ghost else \
            Direction(matrix=U64.float(), scale=scale)
        U = U64 if ghost else U64.float().double()
        K.reset_launch_counts()
        adapt, stab = linear_values(a, g, eta, direction, ("diag", F), delta)
        counts = K.launch_counts()
        assert counts.get("bilinear", 0) >= 1 and (counts.get("ghost_dot", 0) >= 1) == ghost, counts
        assert adapt.dtype == torch.float32 and stab.dtype == torch.float32
        want_a = eta * scale * brute_bilinear(a64, g64, U)[0]
        want_s = eta * brute_bilinear(a64, g64, F.double() * delta.double())[0] \
            - 0.5 * eta * eta * brute_fisher(a64, g64, F.double())[0]
        torch.testing.assert_close(adapt.double(), want_a, rtol=1e-5, atol=1e-5 * want_a.abs().max().item())
        torch.testing.assert_close(stab.double(), want_s, rtol=1e-5, atol=1e-5 * want_s.abs().max().item())
    # the reverse mix, with kfac: the drift through `bilinear` on the scaled rows
    f_out, f_in = torch.rand(d_out, generator=gen) + 0.1, torch.rand(d_in, generator=gen) + 0.1
    K.reset_launch_counts()
    adapt, stab = linear_values(a.float(), g.bfloat16(), eta, None, ("kfac", f_out, f_in), delta)
    assert K.launch_counts().get("bilinear", 0) == 1 and torch.all(adapt == 0)
    a64, g64 = a.double(), g.bfloat16().double()
    want = eta * brute_bilinear(a64 * f_in.double(), g64 * f_out.double(), delta.double())[0] \
        - 0.5 * eta * eta * ((g64 ** 2) @ f_out.double()) * ((a64 ** 2) @ f_in.double())
    torch.testing.assert_close(stab.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@gpu
@needs_cuda
@pytest.mark.parametrize("family,kind", [("gpt2", "diag"), ("llama", "kfac")])
def test_bf16_engine_through_compiled_kernels_stays_close_to_float64_brute_force(family, kind):
    """Compiled Triton on CUDA, a bf16 model (values accumulate in fp32): within bf16's forward error of the
    float64 brute force on the same (bf16-rounded) weights, and the kernels really ran."""
    seed = 440 if family == "gpt2" else 450
    model, twin, valuer, names, full, theta0 = _case(family, kind, seed, torch.bfloat16, "cuda")
    batch = random_batch(seed + 4, B=2, T=8)
    K.reset_launch_counts()
    tv = valuer.value(batch)
    assert K.launch_counts().get("bilinear", 0) >= len(names)
    want = brute_values(twin, batch, names[0], names[1:], 0.7, 1.3, 0.6, fisher=full, reference=theta0)
    for key in FIELDS:  # bf16 forward and backward: relative error of a few 1e-2 on the values
        got = getattr(tv, key).double().cpu()
        rel = (got - want[key]).norm() / want[key].norm()
        assert rel < 0.1, f"{key}: relative error {rel:.3f}"
