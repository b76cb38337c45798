"""`alphatoken bench`: run benchmarks/gpu_bench.py and print its table, or, without that script (or with
--builtin), a small timing of alphatoken.kernels against plain torch."""
from __future__ import annotations

import os
import sys
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
    """Time each op's providers side by side (`alphatoken.benchtools`, the harness of benchmarks/): the kernel,
    its eager torch peer, and the per-token route on a slice of rows, scaled to N."""
    import torch

    from ..benchtools import TORCH_FNS, contract_per_token, outer_grads, time_interleaved

    reps = 3 if quick else 7
    cpu = torch.device("cpu")
    for N, d_in, d_out in shapes:
        V = 32
        t = {"a": torch.randn(N, d_in), "g": torch.randn(N, d_out), "M": torch.randn(d_out, d_in),
             "F": torch.rand(d_out, d_in), "a_ref": torch.randn(V, d_in), "g_ref": torch.randn(V, d_out)}
        n_mat = min(N, 64)  # per-token gradients get big fast: time a slice, scale to N
        part = {**t, "a": t["a"][:n_mat], "g": t["g"][:n_mat]}
        for op in ("bilinear", "fisher_norm", "ghost_dot"):
            args = _op_args(op, t)
            providers = {
                "alphatoken": lambda op=op, args=args: getattr(K, op)(*args),
                "torch": lambda op=op, args=args: TORCH_FNS[op](*args),
                "materialized": lambda op=op: contract_per_token(op, outer_grads(part["a"], part["g"]), part),
            }
            timings = time_interleaved(providers, cpu, rounds=reps, inner=1, warmup=1)
            for provider, (ms, _, _) in timings.items():
                timed = n_mat if provider == "materialized" else N
                if timed < N:  # an estimate, not a measurement: marked in its own column
                    ms *= N / timed
                backend = K.backend_for(t["a"]) if provider == "alphatoken" else "torch"
                rows.append({"op": op, "N": N, "d_in": d_in, "d_out": d_out, "provider": provider,
                             "backend": backend, "median_ms": ms, "timed_rows": timed,
                             "extrapolated": "true" if timed < N else "false"})


def _op_args(op: str, t: dict) -> tuple:
    """The kernel's positional arguments for `op` from the case's tensors."""
    if op == "bilinear":
        return t["a"], t["g"], t["M"]
    if op == "fisher_norm":
        return t["a"], t["g"], t["F"]
    return t["a"], t["g"], t["a_ref"], t["g_ref"]


def _format_rows(rows: list[dict]) -> str:
    cols = ["op", "N", "d_in", "d_out", "provider", "backend", "median_ms", "vs_torch"]
    torch_ms = {(r["op"], r["N"], r["d_in"]): r["median_ms"] for r in rows if r["provider"] == "torch"}
    table = []
    for r in rows:
        base = torch_ms.get((r["op"], r["N"], r["d_in"]))
        mark = "*" if r.get("extrapolated") == "true" else ""
        table.append([str(r["op"]), str(r["N"]), str(r["d_in"]), str(r["d_out"]), r["provider"], r["backend"],
                      f"{r['median_ms']:.3f}{mark}", f"{base / r['median_ms']:.2f}x{mark}" if base else "-"])
    from ..benchtools import text_table

    lines = text_table(cols, table)
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
