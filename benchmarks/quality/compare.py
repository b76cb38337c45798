"""Paired read-out of quality runs: each method against full-token SFT at the same seed, and against the
full-SFT learning-rate curve (the trade-off between learning and forgetting that needs no masking).

    python benchmarks/quality/compare.py --keep-ratio 0.8 --out benchmarks/quality/out_r3/k08_6seeds \
        benchmarks/quality/out_r2/main benchmarks/quality/out_r2/var_k08 benchmarks/quality/out_r3/k08 \
        benchmarks/quality/out_r3/curve

Reads the results.csv of every folder given (or the CSV file given; the first row of a (method, seed) counts).
Methods are rows at --keep-ratio; the reference `full` and the curve (`full` plus every `full_lr*`) are taken at
any keep ratio (they mask nothing). Writes <out>/results.csv (the rows used, the methods renamed `<name>@<keep>`),
<out>/paired.md and <out>/quality.png.

Paired: for every seed that both a method and `full` ran, d = method − full in target exact match and in mean
retention drop; reported as mean ± standard error over seeds. Curve gap: the method's mean target EM minus the
curve's EM at the method's mean drop (linear between the curve's points; blank outside its range).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as quality_run  # noqa: E402


def is_curve(name: str) -> bool:
    return name == "full" or name.startswith("full_lr")


def per_seed(rows, method: str) -> dict:
    return {int(float(r["seed"])): (float(r["target_exact_match"]), float(r["mean_drop"]))
            for r in rows if r["method"] == method}


def mean_se(values):
    if not values:
        return float("nan"), float("nan")
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.mean(values), se


def curve_points(rows) -> list:
    """(mean drop, mean target EM) of every full-SFT learning rate, sorted by drop."""
    names = sorted({r["method"] for r in rows if is_curve(r["method"])})
    points = []
    for name in names:
        runs = per_seed(rows, name).values()
        points.append((statistics.mean(d for _, d in runs), statistics.mean(e for e, _ in runs)))
    return sorted(points)


def curve_at(points, drop: float) -> float:
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= drop <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (drop - x0) / (x1 - x0)
    return float("nan")


def paired(rows, methods) -> list[dict]:
    """One dict per method: seeds, EM and drop (mean ± std), paired d vs full (mean ± se), the curve gap."""
    full = per_seed(rows, "full")
    points = curve_points(rows)
    out = []
    for name in methods:
        mine = per_seed(rows, name)
        seeds = sorted(set(mine) & set(full))
        em = [mine[s][0] for s in sorted(mine)]
        drop = [mine[s][1] for s in sorted(mine)]
        d_em = [mine[s][0] - full[s][0] for s in seeds]
        d_drop = [mine[s][1] - full[s][1] for s in seeds]
        out.append({
            "method": name, "seeds": len(mine),
            "em": statistics.mean(em), "em_std": statistics.stdev(em) if len(em) > 1 else 0.0,
            "drop": statistics.mean(drop), "drop_std": statistics.stdev(drop) if len(drop) > 1 else 0.0,
            "paired_seeds": len(seeds),
            "d_em": mean_se(d_em), "d_drop": mean_se(d_drop),
            "curve_gap": statistics.mean(em) - curve_at(points, statistics.mean(drop)),
        })
    return out


def markdown(results) -> str:
    lines = ["| method | seeds | target EM | mean drop | Δ EM vs full (paired, ± se) | Δ drop vs full (paired, ± se) "
             "| EM − lr curve |", "|---|---|---|---|---|---|---|"]
    for r in results:
        gap = "" if math.isnan(r["curve_gap"]) else f"{r['curve_gap']:+.3f}"
        lines.append(f"| {r['method']} | {r['seeds']} | {r['em']:.3f} ± {r['em_std']:.3f} | "
                     f"{r['drop']:.3f} ± {r['drop_std']:.3f} | {r['d_em'][0]:+.3f} ± {r['d_em'][1]:.3f} | "
                     f"{r['d_drop'][0]:+.3f} ± {r['d_drop'][1]:.3f} | {gap} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="folders holding a results.csv, or results CSV files")
    parser.add_argument("--keep-ratio", type=float, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    sources = [Path(f) if Path(f).is_file() else Path(f) / "results.csv" for f in args.folders]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        parser.error(f"no results CSV at: {', '.join(missing)}")
    rows = [r for source in sources for r in quality_run.read_rows(source)]
    used, methods = [], []
    for r in rows:
        if is_curve(r["method"]):
            used.append(r)
        elif abs(float(r["keep_ratio"]) - args.keep_ratio) < 1e-9:
            r = dict(r, method=f"{r['method']}@{args.keep_ratio:g}")
            used.append(r)
            if r["method"] not in methods:
                methods.append(r["method"])
    seen, unique = set(), []
    for r in used:  # a (method, seed) found in two folders counts once
        key = (r["method"], int(float(r["seed"])))
        if key not in seen:
            seen.add(key)
            unique.append(r)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    csv_path.unlink(missing_ok=True)
    for r in unique:
        quality_run.append_row(csv_path, r)
    results = paired(unique, methods)
    md = markdown(results)
    (out / "paired.md").write_text(md)
    print(md)
    quality_run.plot(csv_path, out / "quality.png")
    return results


if __name__ == "__main__":
    main()
