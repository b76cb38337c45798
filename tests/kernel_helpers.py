"""Shared helpers for the kernel tests: float64 brute force, per-dtype tolerances, a mismatch report.

The brute force here is written from the math of DESIGN §3/§6 in float64 and deliberately does not import
`kernels/reference.py`, so the references are tested against it too.
"""
from __future__ import annotations

import zlib

import torch

# Allowed error, relative to the magnitude of the sum (the same sum over absolute values), per input dtype.
# The truth is computed from the exact (already rounded) input values, so only accumulation error counts:
# fp32 accumulation over up to ~10^4 terms, fp32 products (tf32x3 on GPU) for all dtypes.
RTOL = {torch.float32: 2e-5, torch.bfloat16: 5e-5, torch.float16: 5e-5}


def seed_for(request) -> int:
    """A different seed for every test case (derived from its node id), fixed from run to run."""
    return zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF


def randn(gen: torch.Generator, *shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def d64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=torch.float64)


# ---- float64 brute force (value, magnitude): magnitude = the same sum with every factor in absolute value ----

def brute_bilinear(a, g, M) -> tuple[torch.Tensor, torch.Tensor]:
    """g_tᵀ M a_t for one (d_out, d_in) matrix: (N,) value and magnitude, float64."""
    a, g, M = d64(a), d64(g), d64(M)
    value = torch.einsum("to,oi,ti->t", g, M, a)
    magnitude = torch.einsum("to,oi,ti->t", g.abs(), M.abs(), a.abs())
    return value, magnitude


def brute_fisher(a, g, F) -> tuple[torch.Tensor, torch.Tensor]:
    """⟨F, (g_t a_tᵀ)²⟩ built explicitly from the rank-1 credit, float64."""
    a, g, F = d64(a), d64(g), d64(F)
    value, magnitude = torch.zeros(a.shape[0], dtype=torch.float64), torch.zeros(a.shape[0], dtype=torch.float64)
    step = max(1, (1 << 22) // max(1, F.numel()))  # rows per chunk: keep the (rows, d_out, d_in) block small
    for lo in range(0, a.shape[0], step):
        credit_sq = (g[lo:lo + step, :, None] * a[lo:lo + step, None, :]) ** 2  # (rows, d_out, d_in)
        value[lo:lo + step] = (credit_sq * F).sum(dim=(1, 2))
        magnitude[lo:lo + step] = (credit_sq * F.abs()).sum(dim=(1, 2))
    return value, magnitude


def brute_ghost(a, g, a_ref, g_ref) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_v (g_t·g'_v)(a_t·a'_v), evaluated as g_tᵀ (Σ_v g'_v a'_vᵀ) a_t in float64 (a different grouping)."""
    a, g, a_ref, g_ref = d64(a), d64(g), d64(a_ref), d64(g_ref)
    target = torch.einsum("vo,vi->oi", g_ref, a_ref)
    value = torch.einsum("to,oi,ti->t", g, target, a)
    magnitude = ((g.abs() @ g_ref.abs().T) * (a.abs() @ a_ref.abs().T)).sum(dim=1)
    return value, magnitude


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, rtol: float,
                   what: str = "result", show: int = 5) -> None:
    """Fail when |actual − expected| > rtol·(magnitude + 1e-30) anywhere (NaN fails), listing the first misses."""
    actual = d64(actual)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    allowed = rtol * (d64(magnitude) + 1e-30)
    err = (actual - expected).abs()
    bad = ~(err <= allowed)  # NaN compares False, so it is bad
    if bool(bad.any()):
        idx = bad.nonzero()[:show].tolist()
        lines = [
            f"  at {tuple(i)}: got {actual[tuple(i)].item():.9g}, expected {expected[tuple(i)].item():.9g}, "
            f"|diff| {err[tuple(i)].item():.3g} > allowed {allowed[tuple(i)].item():.3g}"
            for i in idx
        ]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements mismatch (rtol {rtol:g} of magnitude); first:\n"
            + "\n".join(lines)
        )
