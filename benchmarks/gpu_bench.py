"""The one benchmark script: AlphaToken's kernels against their peers, then what a training step costs.

Run as a script (prints one table, writes one CSV)::

    python benchmarks/gpu_bench.py                    # full GPU run (~8 min on an H100)
    python benchmarks/gpu_bench.py --quick            # a few sizes, a few minutes
    python benchmarks/gpu_bench.py --cpu              # tiny CPU sizes (reference / Triton interpreter / torch)
    python benchmarks/gpu_bench.py --cpu --quick --no-compile --no-step   # the smoke test's seconds-long run

or import by path (benchmarks/ is not an installed package) and call `run(...)` / `format_table(rows)`::

    spec = importlib.util.spec_from_file_location("alphatoken_gpu_bench", "benchmarks/gpu_bench.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    rows = mod.run(quick=True, cpu=True); print(mod.format_table(rows))

Kernel cases (DESIGN §6): `bilinear`, `fisher_norm`, the fused `bilinear_fisher_norm` and `ghost_dot`, each with
providers
* `triton`         alphatoken.kernels (compiled Triton on CUDA; `triton_interp` on CPU with TRITON_INTERPRET=1)
* `reference`      the same call forced onto kernels/reference.py (CPU only: on CUDA it is just torch)
* `torch`          the eager formulation a user would write (one GEMM per form, then a row reduction)
* `torch_compile`  that eager function under torch.compile(dynamic=True): one compile per op and dtype
* `materialized`   per-token gradients g_t a_tᵀ built with torch.func.vmap(grad) (N × d_out × d_in), then
                   contracted: the thing the ghost trick avoids; skipped (with the reason in the row) where
                   it would not fit
* `triton_dense`   ghost_dot only: `bilinear(a, g, G'ᵀA')`, the materialized branch of the dispatcher
and the vendor matmul of the same FLOPs in the same dtype (cuBLAS on CUDA) timed before and after the
providers of every case, so that `pct_of_matmul` compares against a rate measured in the same run.

FLOPs counted: bilinear and fisher_norm 2·N·d_in·d_out; fused 4·N·d_in·d_out; ghost_dot 2·N·V·(d_in+d_out).
The matmul of the same FLOPs: (N, d_in)@(d_in, d_out); fused (N, d_in)@(d_in, 2·d_out);
ghost (N, d_in+d_out)@(d_in+d_out, V).

float32 cases run with `torch.set_float32_matmul_precision(--fp32-matmul)`, default "high" (TF32 for cuBLAS,
eager and compile, as Triton's default for a float32 `tl.dot`); the setting is in every row's note.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # siblings import by name whether run as a script, by path or under pytest
    sys.path.insert(0, str(_HERE))

import torch  # noqa: E402

import bench_common as C  # noqa: E402
from alphatoken.benchtools import (TORCH_FNS, contract_per_token, outer_grads,  # noqa: E402,F401 (peers: API)
                                   torch_bilinear, torch_bilinear_fisher_norm, torch_fisher_norm, torch_ghost_dot)
from bench_table import PROVIDER_ORDER, format_table  # noqa: E402,F401 (format_table: this script's API)

OPS = ("bilinear", "fisher_norm", "bilinear_fisher_norm", "ghost_dot")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------- sizes
def kernel_cases(quick: bool, cpu: bool) -> List[dict]:
    """The (op, dtype, N, V, d) grid; bf16 first so that a run cut short keeps the headline cases."""
    if cpu and quick:
        Ns, ds, dts, extra_ghost = [64], [32], ["fp32"], []
    elif cpu:
        Ns, ds, dts, extra_ghost = [128, 512], [64, 256], ["fp32", "bf16"], []
    elif quick:
        Ns, ds, dts, extra_ghost = [512, 4096], [2048], ["bf16", "fp32"], [(8192, 2048)]
    else:
        Ns, ds, dts, extra_ghost = [512, 4096, 16384], [1024, 4096], ["bf16", "fp32"], [(8192, 1024), (8192, 4096)]
    cases = []
    for dt in dts:
        for d in ds:
            for N in Ns:
                for op in OPS:
                    cases.append(dict(op=op, dtype=dt, N=N, V=N if op == "ghost_dot" else None, d=d))
        for N, d in extra_ghost:  # the ghost_dot target point N = V = 8192 of DESIGN §8.2
            cases.append(dict(op="ghost_dot", dtype=dt, N=N, V=N, d=d))
    return cases


def flops_of(op: str, N: int, V: Optional[int], d_in: int, d_out: int) -> float:
    if op in ("bilinear", "fisher_norm"):
        return 2.0 * N * d_in * d_out
    if op == "bilinear_fisher_norm":
        return 4.0 * N * d_in * d_out
    if op == "ghost_dot":
        return 2.0 * N * V * (d_in + d_out)
    raise ValueError(op)


def matmul_shape(op: str, N: int, V: Optional[int], d_in: int, d_out: int) -> tuple[int, int, int]:
    """(m, k, n) of the plain matmul with the same FLOPs as the op (2·m·k·n)."""
    if op in ("bilinear", "fisher_norm"):
        return N, d_in, d_out
    if op == "bilinear_fisher_norm":
        return N, d_in, 2 * d_out
    return N, d_in + d_out, V


# ------------------------------------------------------------------------------------------ torch peers
# The eager peers and the per-token contraction are the package's (alphatoken.benchtools), shared with
# `alphatoken bench --builtin`.
_COMPILED: Dict[str, Callable] = {}


def compiled(op: str) -> Callable:
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(TORCH_FNS[op], dynamic=True)
    return _COMPILED[op]


def per_token_grads(a: torch.Tensor, g: torch.Tensor, method: str = "func") -> torch.Tensor:
    """The per-token weight gradients g_t a_tᵀ, (N, d_out, d_in), by torch.func.vmap(grad) (or, in the
    seconds-long smoke mode, method="outer", by a broadcast outer product: the same tensor without importing
    torch._dynamo)."""
    if method == "outer":
        return outer_grads(a, g)
    from torch.func import grad, vmap

    W = _per_token_grads_weight(g.shape[1], a.shape[1], a.dtype, a.device)

    def token_loss(W, a_t, g_t):  # z_t = W a_t with upstream gradient g_t: ∂/∂W = g_t a_tᵀ
        return (g_t * (W @ a_t)).sum()

    return vmap(grad(token_loss), in_dims=(None, 0, 0))(W, a, g)


_W_CACHE: Dict[tuple, torch.Tensor] = {}


def _per_token_grads_weight(d_out, d_in, dtype, device):
    key = (d_out, d_in, dtype, str(device))
    if key not in _W_CACHE:
        _W_CACHE.clear()
        _W_CACHE[key] = torch.randn(d_out, d_in, dtype=dtype, device=device)
    return _W_CACHE[key]


def materialized(op: str, t: dict, per_token: str = "func"):
    return contract_per_token(op, per_token_grads(t["a"], t["g"], per_token), t)


def materialized_bytes(op: str, N: int, d_in: int, d_out: int, elt: int) -> int:
    """What the per-token route holds at once: the N·d_out·d_in gradients, and their squares for Fisher."""
    copies = 2 if op in ("fisher_norm", "bilinear_fisher_norm") else 1
    return (copies + 1) * N * d_in * d_out * elt  # + one temporary of vmap's batched outer product


# ------------------------------------------------------------------------------------------ kernel bench
def make_inputs(op, dtype, N, V, d_in, d_out, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: no host round trip

    def rnd(*shape, positive=False):
        draw = torch.rand if positive else torch.randn
        return draw(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    t = {"a": rnd(N, d_in), "g": rnd(N, d_out)}
    if op in ("bilinear", "bilinear_fisher_norm"):
        t["M"] = rnd(d_out, d_in) / math.sqrt(d_in)
    if op in ("fisher_norm", "bilinear_fisher_norm"):
        t["F"] = rnd(d_out, d_in, positive=True)
    if op == "ghost_dot":
        t["a_ref"] = rnd(V, d_in) / math.sqrt(V)
        t["g_ref"] = rnd(V, d_out)
    return t


def _args(op, t):
    if op == "bilinear":
        return t["a"], t["g"], t["M"]
    if op == "fisher_norm":
        return t["a"], t["g"], t["F"]
    if op == "bilinear_fisher_norm":
        return t["a"], t["g"], t["M"], t["F"]
    return t["a"], t["g"], t["a_ref"], t["g_ref"]


def _truth(op, t):
    """float64 values from the upcast inputs (same formulas, no rounding to speak of)."""
    t64 = {k: v.double() for k, v in t.items()}
    return TORCH_FNS[op](*_args(op, t64))


def _rel_err(out, ref) -> float:
    if isinstance(ref, tuple):
        return max(_rel_err(o, r) for o, r in zip(out, ref))
    out = out.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def _tolerance(dtype: torch.dtype) -> float:
    return 3e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-2  # fp32 may run as TF32


def providers_for(op, t, device, compile_ok: bool, interp: bool, per_token: str = "func") -> Dict[str, Callable]:
    import alphatoken.kernels as K

    fn = getattr(K, op)
    args = _args(op, t)
    out: Dict[str, Callable] = {}
    if device.type == "cuda":
        out["triton"] = lambda: fn(*args)
    else:
        if interp:
            out["triton_interp"] = lambda: fn(*args)

        def ref():
            with K.use_backend("reference"):
                return fn(*args)

        out["reference"] = ref
    out["torch"] = lambda: TORCH_FNS[op](*args)
    if compile_ok:
        cf = compiled(op)
        out["torch_compile"] = lambda: cf(*args)
    out["materialized"] = lambda: materialized(op, t, per_token)
    if op == "ghost_dot":
        out["triton_dense"] = lambda: K.bilinear(t["a"], t["g"], K.materialize_reference(t["a_ref"], t["g_ref"]))
    return out


def _skips(op, fns, N, d_in, d_out, t, flops, device, cfg) -> Dict[str, str]:
    """{provider: why it is skipped}: the per-token route where it cannot fit (the row says so), the interpreter
    where too slow, the dense ghost route on the CPU."""
    skips: Dict[str, str] = {}
    need = materialized_bytes(op, N, d_in, d_out, t["a"].element_size())
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = 0.6 * free
    else:
        budget = cfg["cpu_mem_budget"]
    if need > budget:
        skips["materialized"] = f"skipped: per-token grads need {need / 2**30:.1f} GiB > budget {budget / 2**30:.1f} GiB (would OOM)"
    if "triton_interp" in fns and flops / 2 > cfg["interp_max_work"]:
        skips["triton_interp"] = "skipped: too slow for Triton's interpreter at this size"
    if op == "ghost_dot" and "triton_dense" in fns and device.type != "cuda":
        skips["triton_dense"] = "skipped on CPU (same as reference bilinear)"
    return skips


def _check_providers(fns, truth, dtype, device, cfg, skips: Dict[str, str]):
    """(the providers that ran, their notes, their status): one warm call each, checked against the truth; a
    provider that fails or runs out of time or memory is added to `skips`."""
    notes: Dict[str, str] = {}
    status: Dict[str, str] = {}
    live: Dict[str, Callable] = {}
    for name, fn in fns.items():
        if time.monotonic() > cfg["deadline"]:
            skips[name] = "skipped: time budget of the run spent"
            continue
        try:
            out = fn()  # warm call: compiles, autotunes
            C.sync(device)
            err = _rel_err(out, truth)
            notes[name] = f"rel_err={err:.1e}"
            status[name] = "ok" if err <= _tolerance(dtype) and math.isfinite(err) else "error"
            if status[name] == "error":
                notes[name] += f" > tol {_tolerance(dtype):.0e}"
            del out
            live[name] = fn
        except torch.cuda.OutOfMemoryError:
            skips[name] = "skipped: out of memory"
        except Exception as e:  # a provider failing must not cost the other rows
            skips[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    return live, notes, status


def _time_providers(live, mm, mm_name: str, device, cfg, skips: Dict[str, str]):
    """(timings, peak memory, the matmul's (median, q20, q80), its note): on CUDA each provider timed alone with
    the matmul before and after; on the CPU all interleaved with the matmul."""
    timings: Dict[str, tuple] = {}
    peaks: Dict[str, Optional[float]] = {}
    if device.type == "cuda":
        mm_a = C.time_cuda(mm, cfg["warmup_ms"], cfg["rep_ms"])
        for name, fn in live.items():
            try:
                timings[name] = C.time_cuda(fn, cfg["warmup_ms"], cfg["rep_ms"])
                peaks[name] = C.peak_extra_mib(fn, device)
            except torch.cuda.OutOfMemoryError:
                skips[name] = "skipped: out of memory while timing"
            except Exception as e:
                skips[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            gc.collect()
            torch.cuda.empty_cache()
        mm_b = C.time_cuda(mm, cfg["warmup_ms"], cfg["rep_ms"])
        mm_med = min(mm_a[0], mm_b[0])
        return timings, peaks, (mm_med, min(mm_a[1], mm_b[1]), max(mm_a[2], mm_b[2])), \
            f"before/after {mm_a[0]:.4g}/{mm_b[0]:.4g} ms"
    all_fns = dict(live)
    all_fns[mm_name] = mm
    res = C.time_interleaved(all_fns, device, rounds=cfg["rounds"], warmup=0, min_round_s=cfg["min_round_s"])
    mm_row = res.pop(mm_name)
    return res, peaks, mm_row, "interleaved with the providers"


def bench_kernel_case(case, device, env, cfg) -> List[dict]:
    op, dname, N, V, d = case["op"], case["dtype"], case["N"], case["V"], case["d"]
    dtype = DTYPES[dname]
    d_in = d_out = d
    flops = flops_of(op, N, V, d_in, d_out)
    base = dict(bench="kernel", op=op, dtype=dname, N=N, V=V if V else "", d_in=d_in, d_out=d_out, flops=flops)
    prec = torch.get_float32_matmul_precision()
    t = make_inputs(op, dtype, N, V, d_in, d_out, device, seed=cfg["seed"] + N + d)
    m, k, n = matmul_shape(op, N, V, d_in, d_out)
    gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 1)
    A = torch.randn(m, k, generator=gen, device=device).to(dtype)  # random, never zeros (DESIGN §14)
    B = torch.randn(k, n, generator=gen, device=device).to(dtype)
    mm_name = "cublas" if device.type == "cuda" else "matmul"
    mm = lambda: A @ B  # noqa: E731

    fns = providers_for(op, t, device, cfg["compile"], cfg["interp"], cfg["per_token"])
    skips = _skips(op, fns, N, d_in, d_out, t, flops, device, cfg)
    for name in skips:
        fns.pop(name, None)
    # correctness once per provider (fresh inputs per case), then time
    live, notes, status = _check_providers(fns, _truth(op, t), dtype, device, cfg, skips)
    timings, peaks, mm_row, mm_note = _time_providers(live, mm, mm_name, device, cfg, skips)
    mm_med = mm_row[0]
    torch_ms = timings.get("torch", (None,))[0]
    mat_ms = timings.get("materialized", (None,))[0]

    rows = [C.make_row(env, **base, provider=mm_name, median_ms=mm_row[0], q20_ms=mm_row[1], q80_ms=mm_row[2],
                       tflops=flops / (mm_med * 1e-3) / 1e12, matmul_ms=mm_med, pct_of_matmul=100.0,
                       note=f"{m}x{k}x{n}; {mm_note}; fp32 matmul precision={prec}")]
    rows[0]["bench"] = "matmul"
    for name in [p for p in PROVIDER_ORDER if p in fns or p in skips]:
        if name in timings:
            med, q20, q80 = timings[name]
            rows.append(C.make_row(
                env, **base, provider=name, median_ms=med, q20_ms=q20, q80_ms=q80,
                tflops=flops / (med * 1e-3) / 1e12, matmul_ms=mm_med, pct_of_matmul=100.0 * mm_med / med,
                speedup_vs_torch=(torch_ms / med) if torch_ms else None,
                speedup_vs_materialized=(mat_ms / med) if mat_ms else None,
                peak_mib=peaks.get(name), status=status.get(name, "ok"),
                note=notes.get(name, "") + (f"; fp32 matmul precision={prec}" if dname == "fp32" else "")
                + (f"; per-token grads by {'torch.func vmap(grad)' if cfg['per_token'] == 'func' else 'outer products'}"
                   if name == "materialized" else "")))
        elif name in skips:
            rows.append(C.make_row(env, **base, provider=name,
                                   status="error" if skips[name].startswith("error") else "skipped",
                                   note=skips[name]))
    if device.type == "cuda":  # the inputs go with this frame
        gc.collect()
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------- driver
def run(quick: bool = False, cpu: bool = False, *, step: bool = True, kernels: bool = True,
        compile: Optional[bool] = None, csv_path: Optional[str] = None, budget_s: Optional[float] = None,
        step_budget_s: Optional[float] = None, fp32_matmul: str = "high", ops: Optional[List[str]] = None,
        interp: Optional[bool] = None, seed: int = 0, log=None) -> List[dict]:
    """Run the benchmark; return the rows (see bench_common.COLUMNS) and write them to `csv_path` if given.

    cpu=True runs on the CPU whatever is present (tiny sizes); otherwise CUDA is required.
    compile=None: torch.compile on CUDA, off for cpu+quick (its compile time dwarfs a tiny run).
    interp=None: on the CPU, add the `triton_interp` provider when TRITON_INTERPRET=1 was set before import.
    """
    log = log or (lambda *a: print(*a, file=sys.stderr, flush=True))
    if cpu:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: run with cpu=True (--cpu) for the tiny CPU mode")
        device = torch.device("cuda")
    import alphatoken.kernels as K

    interp = device.type == "cpu" and K.interpreter_enabled() and interp is not False
    if compile is None:
        compile = not (cpu and quick)
    torch.set_float32_matmul_precision(fp32_matmul)
    mode = ("cpu" if cpu else "gpu") + ("-quick" if quick else "")
    env = C.environment(device, mode)
    t0 = time.monotonic()
    if budget_s is None:
        budget_s = (60 if quick else 300) if cpu else (150 if quick else 270)
    cfg = dict(seed=seed, compile=compile, interp=interp, deadline=t0 + budget_s,
               per_token="outer" if (cpu and quick) else "func",  # "func": torch.func.vmap(grad)
               warmup_ms=10 if quick else 15, rep_ms=40 if quick else 60,
               rounds=3 if (quick and cpu) else (5 if quick else 9), min_round_s=0.001 if quick else 0.02,
               cpu_mem_budget=2**28 if quick else 2**30,
               interp_max_work=2**16 if quick else 2**21)
    out = C.IncrementalCSV(Path(csv_path) if csv_path else None)
    rows: List[dict] = []
    log(f"[gpu_bench] {env['device']} | torch {env['torch']} triton {env['triton']} "
        f"transformers {env['transformers']} | mode {mode} | compile={compile} interp={interp}")
    try:
        if kernels:
            for case in kernel_cases(quick, cpu):
                if ops and case["op"] not in ops:
                    continue
                try:
                    new = bench_kernel_case(case, device, env, cfg)
                except Exception as e:  # keep going: one broken case is one row
                    traceback.print_exc()
                    new = [C.make_row(env, bench="kernel", op=case["op"], provider="*", dtype=case["dtype"],
                                      N=case["N"], d_in=case["d"], d_out=case["d"], status="error",
                                      note=f"{type(e).__name__}: {e}"[:200])]
                for r in new:
                    out.add(r)
                rows.extend(new)
                log(f"[gpu_bench] {case['op']:>22} {case['dtype']} N={case['N']} d={case['d']}: "
                    + ", ".join(f"{r['provider']}={r['median_ms']:.4g}ms" if r["median_ms"] != "" else
                                f"{r['provider']}:{r['status']}" for r in new)
                    + f"  [{time.monotonic() - t0:.0f}s]")
        if step:
            import step_bench

            try:
                srows = step_bench.run(device=device, quick=quick, env=env,
                                       budget_s=step_budget_s if step_budget_s is not None
                                       else ((60 if quick else 240) if cpu else (120 if quick else 180)),
                                       log=log)
            except Exception as e:
                traceback.print_exc()
                srows = [C.make_row(env, bench="step", op="*", provider="*", status="error",
                                    note=f"{type(e).__name__}: {e}"[:200])]
            for r in srows:
                out.add(r)
            rows.extend(srows)
    finally:
        out.close()
    log(f"[gpu_bench] done in {time.monotonic() - t0:.0f}s" + (f"; rows in {csv_path}" if csv_path else ""))
    return rows


# ------------------------------------------------------------------------------------------------ table
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few sizes only")
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (Triton interpreter if available)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile provider")
    p.add_argument("--no-step", action="store_true", help="kernels only")
    p.add_argument("--no-kernels", action="store_true", help="end-to-end step only")
    p.add_argument("--interpret", choices=("auto", "on", "off"), default="auto",
                   help="--cpu: run the Triton kernels in Triton's interpreter (default: on for --cpu without "
                        "--quick); must be decided before alphatoken.kernels is imported")
    p.add_argument("--ops", nargs="*", choices=OPS, help="only these kernel ops")
    p.add_argument("--csv", default=None, help="where to write the rows (default benchmarks/results/<mode>_<date>.csv)")
    p.add_argument("--budget-s", type=float, default=None, help="time budget of the kernel part (s)")
    p.add_argument("--step-budget-s", type=float, default=None, help="time budget of the step part (s)")
    p.add_argument("--fp32-matmul", choices=("highest", "high", "medium"), default="high")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-csv", nargs="+", default=None, metavar="CSV",
                   help="print the table of stored rows instead of measuring")
    p.add_argument("--threads", type=int, default=1,
                   help="--cpu: torch threads (default 1: on a shared machine a second thread mostly waits at "
                        "barriers for a descheduled partner, which costs more than it gives)")
    args = p.parse_args(argv)
    if args.from_csv:
        print(format_table([r for path in args.from_csv for r in C.read_csv(Path(path))]))
        return 0

    if args.cpu and "alphatoken.kernels" not in sys.modules:
        want = args.interpret == "on" or (args.interpret == "auto" and not args.quick)
        if want:
            os.environ["TRITON_INTERPRET"] = "1"
        elif args.interpret == "off":
            os.environ.pop("TRITON_INTERPRET", None)
    threads_before = torch.get_num_threads()
    if args.cpu:
        torch.set_num_threads(max(1, args.threads))
    mode = ("cpu" if args.cpu else "gpu") + ("-quick" if args.quick else "")
    csv_path = args.csv or str(C.RESULTS_DIR / f"{mode}_{time.strftime('%Y-%m-%d')}.csv")
    rows = run(quick=args.quick, cpu=args.cpu, step=not args.no_step, kernels=not args.no_kernels,
               compile=False if args.no_compile else None, csv_path=csv_path, budget_s=args.budget_s,
               step_budget_s=args.step_budget_s, fp32_matmul=args.fp32_matmul, ops=args.ops,
               interp=False if args.interpret == "off" else None, seed=args.seed)
    torch.set_num_threads(threads_before)
    print(format_table(rows))
    print(f"rows written to {csv_path}")
    return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
