"""The benchmark harness shared by `benchmarks/` and `alphatoken bench`: timing, the torch peers of the kernels,
the per-token contraction they are compared with, and a plain text table.

`benchmarks/` is not an installed package, so what the command line's built-in timing needs lives here and the
benchmark scripts import it (`benchmarks/bench_common.py` re-exports the timing functions).

Timing
* CUDA: `time_cuda`, triton's `do_bench` (CUDA events, L2 flushed before every call, median and quantiles).
* CPU:  `time_interleaved` runs the providers round by round (a rotating order), each round times `inner` calls
  with a host clock, and the median over rounds is kept: on a machine shared with other work every provider sees
  the same background load, in the same rounds, which keeps the ratios meaningful.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


# ------------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cuda(fn: Callable[[], object], warmup_ms: float = 15, rep_ms: float = 60) -> tuple[float, float, float]:
    """(median, q20, q80) in ms with CUDA events and an L2 flush before every call (triton's do_bench)."""
    from triton.testing import do_bench

    med, q20, q80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return float(med), float(q20), float(q80)


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, rounds: int = 7,
                     inner: int = 1, warmup: int = 1,
                     min_round_s: float = 0.0) -> Dict[str, tuple[float, float, float]]:
    """Time several providers side by side: each round runs every provider (rotating order); median/q20/q80 ms.

    `inner` calls per provider per round (the mean of those is one sample); when `min_round_s` is set the inner
    count grows until one sample takes at least that long (short calls need it to rise above clock noise).
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync(device)
    inner_of = {name: _inner_count(fns[name], device, inner, min_round_s) for name in names}
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn, n = fns[name], inner_of[name]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - t0) * 1e3 / n)
    return {name: summarize(s) for name, s in samples.items()}


def _inner_count(fn: Callable[[], object], device: torch.device, inner: int, min_round_s: float) -> int:
    """Calls per sample: `inner`, raised (up to 1000) until one sample lasts `min_round_s` when that is set."""
    if min_round_s <= 0:
        return inner
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    return max(inner, min(1000, int(math.ceil(min_round_s / one))))


def summarize(samples_ms: Sequence[float]) -> tuple[float, float, float]:
    """(median, q20, q80) of the samples."""
    s = sorted(samples_ms)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")  # deciles: q[1] = 20%, q[7] = 80%
    return statistics.median(s), q[1], q[7]


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Extra peak device memory of one call over what was allocated before it (MiB); None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - base) / 2**20


# ------------------------------------------------------------------------------------------ torch peers
def torch_bilinear(a, g, M):
    """Eager `bilinear`: gₜᵀ M aₜ per row, one GEMM and a row reduction."""
    return ((a @ M.T).float() * g.float()).sum(-1)


def torch_fisher_norm(a, g, F):
    """Eager `fisher_norm`: Σ F ⊙ (gₜ aₜᵀ)² per row."""
    return (((a * a) @ F.T).float() * (g * g).float()).sum(-1)


def torch_bilinear_fisher_norm(a, g, M, F):
    """Eager fused pair: (bilinear, fisher_norm)."""
    return torch_bilinear(a, g, M), torch_fisher_norm(a, g, F)


def torch_ghost_dot(a, g, a_ref, g_ref):
    """Eager `ghost_dot`: ⟨gₜ aₜᵀ, Σ_v g'_v a'_vᵀ⟩ per row through the two Gram matrices."""
    return ((g @ g_ref.T).float() * (a @ a_ref.T).float()).sum(-1)


TORCH_FNS = {"bilinear": torch_bilinear, "fisher_norm": torch_fisher_norm,
             "bilinear_fisher_norm": torch_bilinear_fisher_norm, "ghost_dot": torch_ghost_dot}


def contract_per_token(op: str, grads: torch.Tensor, t: dict):
    """What `op` computes, from the materialized per-token gradients `grads` (N, d_out, d_in) and the case's
    other inputs `t` (M, F, or a_ref and g_ref): the route the ghost trick avoids."""
    flat = grads.reshape(grads.shape[0], -1)
    if op == "bilinear":
        return (flat @ t["M"].reshape(-1)).float()
    if op == "fisher_norm":
        return ((flat * flat) @ t["F"].reshape(-1)).float()
    if op == "bilinear_fisher_norm":
        return (flat @ t["M"].reshape(-1)).float(), ((flat * flat) @ t["F"].reshape(-1)).float()
    U = (t["g_ref"].T @ t["a_ref"])  # Σ_v g'_v a'_vᵀ
    return (flat @ U.reshape(-1)).float()


def outer_grads(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The per-token weight gradients gₜ aₜᵀ, (N, d_out, d_in), by a broadcast outer product."""
    return g[:, :, None] * a[:, None, :]


# ------------------------------------------------------------------------------------------------ tables
def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    """Left-aligned columns two spaces apart, a rule of dashes under the header: the lines of the table."""
    table = [list(header)] + [list(r) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "-" * len(lines[0]))
    return lines
