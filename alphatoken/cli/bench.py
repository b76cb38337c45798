"""`alphatoken bench`: run benchmarks/gpu_bench.py and print its table, or, without that script (or with
--builtin), a small timing of alphatoken.kernels against plain torch."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

from .shared import check_output_file, say


def _find_bench_script() -> Optional[Path]:
    candidates = []
    if os.environ.get("ALPHATOKEN_BENCHMARKS"):
        candidates.append(Path(os.environ["ALPHATOKEN_BENCHMARKS"]) / "gpu_bench.py")
    candidates.append(Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_bench.py")
    candidates.append(Path.cwd() / "benchmarks" / "gpu_bench.py")
    for c in candidates:
        if c.is_file():
            return c
    return None


def _builtin_bench(quick: bool) -> list[dict]:
    """A small timing of alphatoken.kernels against plain torch and materialized per-token gradients."""
    import torch

    import alphatoken.kernels as K

    torch.manual_seed(0)
    shapes = [(128, 64, 64)] if quick else [(256, 128, 128), (1024, 256, 256)]
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: steadier medians on a shared machine
    try:
        _time_cases(K, shapes, rows, quick)
    finally:
        torch.set_num_threads(threads)
    return rows


def _time_cases(K, shapes, rows, quick):
    import statistics

    import torch

    def timeit(fn, reps=3 if quick else 7):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    for N, d_in, d_out in shapes:
        a, g = torch.randn(N, d_in), torch.randn(N, d_out)
        M, F = torch.randn(d_out, d_in), torch.rand(d_out, d_in)
        V = 32
        a_ref, g_ref = torch.randn(V, d_in), torch.randn(V, d_out)
        n_mat = min(N, 64)  # per-token gradients get big fast: time a slice, scale to N
        cases = {
            "bilinear": {
                "alphatoken": lambda: K.bilinear(a, g, M),
                "torch": lambda: ((g @ M) * a).sum(-1),
                "materialized": lambda: torch.einsum("no,ni,oi->n", g[:n_mat], a[:n_mat], M),
            },
            "fisher_norm": {
                "alphatoken": lambda: K.fisher_norm(a, g, F),
                "torch": lambda: (((g * g) @ F) * (a * a)).sum(-1),
                "materialized": lambda: ((g[:n_mat, :, None] * a[:n_mat, None, :]) ** 2 * F).sum((1, 2)),
            },
            "ghost_dot": {
                "alphatoken": lambda: K.ghost_dot(a, g, a_ref, g_ref),
                "torch": lambda: ((g @ g_ref.T) * (a @ a_ref.T)).sum(-1),
                "materialized": lambda: ((g[:n_mat, :, None] * a[:n_mat, None, :])
                                         * (g_ref.T @ a_ref)).sum((1, 2)),
            },
        }
        for op, providers in cases.items():
            for provider, fn in providers.items():
                ms = timeit(fn)
                timed = n_mat if provider == "materialized" else N
                if timed < N:  # an estimate, not a measurement: marked in its own column
                    ms *= N / timed
                backend = K.backend_for(a) if provider == "alphatoken" else "torch"
                rows.append({"op": op, "N": N, "d_in": d_in, "d_out": d_out, "provider": provider,
                             "backend": backend, "median_ms": ms, "timed_rows": timed,
                             "extrapolated": "true" if timed < N else "false"})


def _format_rows(rows: list[dict]) -> str:
    cols = ["op", "N", "d_in", "d_out", "provider", "backend", "median_ms", "vs_torch"]
    torch_ms = {(r["op"], r["N"], r["d_in"]): r["median_ms"] for r in rows if r["provider"] == "torch"}
    table = [cols]
    for r in rows:
        base = torch_ms.get((r["op"], r["N"], r["d_in"]))
        mark = "*" if r.get("extrapolated") == "true" else ""
        table.append([str(r["op"]), str(r["N"]), str(r["d_in"]), str(r["d_out"]), r["provider"], r["backend"],
                      f"{r['median_ms']:.3f}{mark}", f"{base / r['median_ms']:.2f}x{mark}" if base else "-"])
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "-" * len(lines[0]))
    if any(r.get("extrapolated") == "true" for r in rows):
        lines.append("* extrapolated: timed on the first `timed_rows` rows and scaled to N (the CSV's "
                     "`extrapolated` column), not measured")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    import torch

    script = None if args.builtin else _find_bench_script()
    cpu = args.cpu or not torch.cuda.is_available()
    csv_target = check_output_file(args.csv, "--csv") if args.csv else None  # before minutes of timing
    if script is not None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("alphatoken_gpu_bench", script)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        say(f"running {script} ({'cpu' if cpu else 'gpu'}{', quick' if args.quick else ''})")
        kwargs = dict(quick=args.quick, cpu=cpu, step=not args.no_step)
        if args.no_compile:
            kwargs["compile"] = False
        if args.ops:
            kwargs["ops"] = args.ops
        tmp = None
        if csv_target is not None:  # the script appends rows as it goes: let it fill a temporary file beside
            tmp = csv_target.with_name(f".{csv_target.name}.{os.getpid()}.tmp")  # --csv, renamed when complete
            kwargs["csv_path"] = str(tmp)
            kwargs["log"] = lambda *a: print(*(str(x).replace(str(tmp), str(csv_target)) for x in a),
                                             file=sys.stderr, flush=True)
        try:
            rows = mod.run(**kwargs)
            if tmp is not None:
                os.replace(tmp, csv_target)
        finally:
            if tmp is not None and tmp.exists():
                tmp.unlink()
        say(mod.format_table(rows))
        if args.csv:
            say(f"rows written to {args.csv}")
        return 0 if all(r.get("status") != "error" for r in rows) else 1
    say(("--builtin" if args.builtin else "benchmarks/gpu_bench.py not found")
        + ": timing alphatoken.kernels against plain torch on "
        f"{'CPU' if cpu else 'CUDA'} (small shapes; median ms, materialized scaled from a 64-token slice)")
    rows = _builtin_bench(args.quick)
    say(_format_rows(rows))
    if args.csv:
        from ..data import atomic_output

        with atomic_output(args.csv) as fh:
            fh.write(",".join(rows[0]) + "\n")
            for r in rows:
                fh.write(",".join(str(v) for v in r.values()) + "\n")
    return 0
