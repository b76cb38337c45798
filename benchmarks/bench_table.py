"""The printed table of benchmark rows (kernel cases and step configurations), shared by gpu_bench.py and
step_bench.py (neither imports the other for it)."""
from __future__ import annotations

import math
from typing import Dict, List

import bench_common as C

PROVIDER_ORDER = ("triton", "triton_interp", "reference", "torch", "torch_compile", "materialized",
                  "triton_dense", "cublas", "matmul")


def _f(v, fmt="{:.3g}", empty="-"):
    v = C.fnum(v) if not isinstance(v, (int, float)) or isinstance(v, bool) else v
    return empty if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def format_table(rows: List[dict]) -> str:
    """One printed table: a line per kernel case (times per provider, and the AlphaToken kernel's rate,
    % of the matmul of the same FLOPs, speed-ups and peak memory), then a line per step configuration."""
    rows = [dict(r) for r in rows]
    lines: List[str] = []
    krows = [r for r in rows if r["bench"] in ("kernel", "matmul")]
    if krows:
        provs = [p for p in PROVIDER_ORDER if any(r["provider"] == p for r in krows)]
        main = next((p for p in ("triton", "reference", "triton_interp") if p in provs), None)
        short = {"triton": "triton", "triton_interp": "interp", "reference": "ref", "torch": "torch",
                 "torch_compile": "compile", "materialized": "mat", "triton_dense": "dense",
                 "cublas": "cublas", "matmul": "matmul"}
        head = (f"{'op':<20} {'dt':<4} {'N':>6} {'V':>6} {'d':>5} | "
                + " ".join(f"{short[p] + ' ms':>10}" for p in provs)
                + f" | {main or '-'}: {'TFLOP/s':>7} {'%mm':>5} {'x torch':>7} {'x mat':>7} {'peakMiB':>8}")
        lines += [head, "-" * len(head)]
        cases: Dict[tuple, Dict[str, dict]] = {}
        for r in krows:
            key = (r["op"], r["dtype"], str(r["N"]), str(r["V"]), str(r["d_in"]))
            cases.setdefault(key, {})[r["provider"]] = r
        for (op, dt, N, V, d), by in cases.items():
            cells = []
            for p in provs:
                r = by.get(p)
                if r is None:
                    cells.append(f"{'':>10}")
                elif r["status"] == "skipped":
                    cells.append(f"{'OOM' if 'OOM' in r['note'] or 'memory' in r['note'] else 'skip':>10}")
                elif r["status"] == "error" and C.fnum(r["median_ms"]) is None:
                    cells.append(f"{'ERR':>10}")
                else:
                    cells.append(f"{_f(r['median_ms'], '{:.4g}') + ('!' if r['status'] == 'error' else ''):>10}")
            m = by.get(main, {}) if main else {}
            lines.append(f"{op:<20} {dt:<4} {N:>6} {V or '':>6} {d:>5} | " + " ".join(cells)
                         + f" | {'':>{len(main or '-') + 1}} {_f(m.get('tflops'), '{:.3g}'):>7} "
                           f"{_f(m.get('pct_of_matmul'), '{:.0f}'):>5} {_f(m.get('speedup_vs_torch'), '{:.2f}'):>7} "
                           f"{_f(m.get('speedup_vs_materialized'), '{:.0f}'):>7} {_f(m.get('peak_mib'), '{:.1f}'):>8}")
        lines.append("(mat = per-token gradients via torch.func; OOM = skipped, would not fit; "
                     "! = result outside tolerance; %mm = % of the matmul rate for the same FLOPs)")
    srows = [r for r in rows if r["bench"] == "step"]
    if srows:
        if lines:
            lines.append("")
        head = f"{'step config':<34} {'median ms':>10} {'q20':>9} {'q80':>9} {'x plain':>8} {'target':>7}  note"
        lines += [head, "-" * len(head)]
        for r in srows:
            lines.append(f"{r['op']:<34} {_f(r['median_ms'], '{:.4g}'):>10} {_f(r['q20_ms'], '{:.4g}'):>9} "
                         f"{_f(r['q80_ms'], '{:.4g}'):>9} {_f(r['ratio_vs_plain'], '{:.3f}'):>8} "
                         f"{_target_of(r):>7}  {r['status'] if r['status'] != 'ok' else ''} "
                         f"{str(r['note']).split('; ')[0][:60]}".rstrip())
    if rows:
        r0 = rows[0]
        lines.append(f"device: {r0['device']} | date {r0['date']} | torch {r0['torch']} | triton {r0['triton']} | "
                     f"transformers {r0['transformers']} | alphatoken {r0['alphatoken']} ({r0['git_rev']}) | "
                     f"mode {r0['mode']} | threads {r0['threads']}")
    return "\n".join(lines)


def _target_of(r) -> str:
    """The DESIGN §8.2 target for this step row (CPU: ≤1.25 direct, ≤1.9 full; GPU: ≤1.10 direct, ≤1.45 full kfac)."""
    label = str(r["op"])
    cpu = str(r["mode"]).startswith("cpu")
    if label.startswith("plain"):
        return ""
    if "direct" in label:
        return "<=1.25" if cpu else "<=1.10"
    if "full" in label:
        if cpu:
            return "<=1.9"
        return "<=1.45" if "kfac" in label else ""
    return ""


# ------------------------------------------------------------------------------------------------- main
