"""pytest-benchmark: the kernels against their peers, one benchmark group per (op, dtype, N, d).

    pytest benchmarks/test_bench_kernels.py --benchmark-enable                    # CPU: small sizes
    pytest benchmarks/test_bench_kernels.py --benchmark-enable -k "not compile"   # without torch.compile
    pytest benchmarks --benchmark-enable --benchmark-json=out.json               # stored stats

Providers as in gpu_bench.py: `triton` (compiled on CUDA, Triton's interpreter on CPU, small sizes only),
`reference` (kernels/reference.py; CPU only), `torch` (eager), `torch_compile`, `materialized` (per-token
gradients by torch.func). The device and versions go into each benchmark's `extra_info`; peak memory too on
CUDA. The side-by-side table with % of the matmul rate is gpu_bench.py's job; this suite gives pytest-benchmark's
statistics (min, median, IQR, rounds) for the same calls.
"""
import pytest
import torch

import bench_common as C
import gpu_bench as GB

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    SHAPES = [(4096, 2048), (16384, 4096)]
    DTYPES = ["bf16", "fp32"]
else:
    SHAPES = [(64, 32), (512, 128)]
    DTYPES = ["fp32"]
PROVIDERS = ["triton", "reference", "torch", "torch_compile", "materialized"]
INTERP_MAX_WORK = 2**17  # N·d_in·d_out(·V) above which Triton's interpreter is too slow for a benchmark
ENV = C.environment(DEVICE, "pytest-benchmark")


def _provider_fn(op, dname, N, d, provider):
    import alphatoken.kernels as K

    if provider == "reference" and CUDA:
        pytest.skip("reference is the CPU fallback; on CUDA it is the torch provider")
    if provider == "triton" and not CUDA:
        if not K.interpreter_enabled():
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before import")
        if GB.flops_of(op, N, N if op == "ghost_dot" else None, d, d) / 2 > INTERP_MAX_WORK:
            pytest.skip("too slow for Triton's interpreter at this size")
    dtype = GB.DTYPES[dname]
    V = N if op == "ghost_dot" else None
    if provider == "materialized":
        need = GB.materialized_bytes(op, N, d, d, torch.finfo(dtype).bits // 8)
        budget = 0.6 * torch.cuda.mem_get_info()[0] if CUDA else 2**29
        if need > budget:
            pytest.skip(f"per-token gradients need {need / 2**30:.1f} GiB: would not fit (OOM)")
    t = GB.make_inputs(op, dtype, N, V, d, d, DEVICE, seed=N + d)
    fns = GB.providers_for(op, t, DEVICE, compile_ok=(provider == "torch_compile"),
                           interp=K.interpreter_enabled())
    key = {"triton": "triton" if CUDA else "triton_interp"}.get(provider, provider)
    return fns[key], t


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("N,d", SHAPES, ids=[f"N{n}-d{d}" for n, d in SHAPES])
@pytest.mark.parametrize("dname", DTYPES)
@pytest.mark.parametrize("op", GB.OPS)
def test_kernel(benchmark, op, dname, N, d, provider):
    fn, t = _provider_fn(op, dname, N, d, provider)
    out = fn()  # warm call: compiles / autotunes, and is checked
    truth = GB._truth(op, t)
    err = GB._rel_err(out, truth)
    assert err <= GB._tolerance(GB.DTYPES[dname]), f"{provider} {op}: relative error {err:.2e}"
    benchmark.group = f"{op} {dname} N={N} d={d}"
    benchmark.extra_info.update({k: ENV[k] for k in ("device", "date", "torch", "triton", "transformers",
                                                      "alphatoken", "git_rev")})
    benchmark.extra_info["flops"] = GB.flops_of(op, N, N if op == "ghost_dot" else None, d, d)
    peak = C.peak_extra_mib(fn, DEVICE)
    if peak is not None:
        benchmark.extra_info["peak_mib"] = peak
    if CUDA:
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=20, iterations=5, warmup_rounds=2)
    else:
        benchmark(fn)
