"""Plot benchmark rows from the stored CSV (never by hand): kernels and end-to-end step ratios.

    python benchmarks/plot.py benchmarks/results/cpu_2026-11-23.csv            # -> the same name, .png
    python benchmarks/plot.py results/a.csv results/b.csv --out fig.png        # several runs together

Left: each kernel case's time per provider (log scale), one panel per op, cases along x. Right: the step
configurations' ratio to the plain SFT step, with the DESIGN §8.2 targets drawn as lines. The device, date and
versions are taken from the rows and written into the title. Needs matplotlib (`pip install alphatoken[plot]`).
"""
from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import bench_common as C  # noqa: E402

PROVIDER_STYLE = OrderedDict([
    ("triton", ("tab:red", "o")), ("triton_interp", ("tab:pink", "o")), ("reference", ("tab:brown", "v")),
    ("torch", ("tab:blue", "s")), ("torch_compile", ("tab:cyan", "D")), ("materialized", ("tab:gray", "x")),
    ("triton_dense", ("tab:orange", "^")), ("cublas", ("black", "_")), ("matmul", ("black", "_")),
])
OPS = ("bilinear", "fisher_norm", "bilinear_fisher_norm", "ghost_dot")


def plot(rows, out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # optional dependency
        raise SystemExit("plotting needs matplotlib: pip install 'alphatoken[plot]' (or pip install matplotlib)") from e

    krows = [r for r in rows if r["bench"] in ("kernel", "matmul") and C.fnum(r["median_ms"]) is not None]
    srows = [r for r in rows if r["bench"] == "step" and C.fnum(r["ratio_vs_plain"]) is not None]
    ops = [op for op in OPS if any(r["op"] == op for r in krows)]
    ncols = len(ops) + (1 if srows else 0)
    if ncols == 0:
        raise SystemExit("no plottable rows (kernel rows with a time, or step rows with a ratio)")
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 4.4), squeeze=False)
    axes = axes[0]
    for ax, op in zip(axes, ops):
        cases = []
        for r in krows:
            if r["op"] == op:
                key = (r["dtype"], int(float(r["N"])), int(float(r["d_in"])))
                if key not in cases:
                    cases.append(key)
        cases.sort(key=lambda k: (k[0], k[2], k[1]))
        x = {k: i for i, k in enumerate(cases)}
        for prov, (color, marker) in PROVIDER_STYLE.items():
            pts = sorted((x[(r["dtype"], int(float(r["N"])), int(float(r["d_in"])))], float(r["median_ms"]))
                         for r in krows if r["op"] == op and r["provider"] == prov)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                        linestyle="-" if prov not in ("cublas", "matmul") else ":", label=prov)
        ax.set_yscale("log")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{dt}\nN{n}\nd{d}" for dt, n, d in cases], fontsize=7)
        ax.set_title(op, fontsize=10)
        ax.set_ylabel("median time (ms)")
        ax.grid(True, which="both", alpha=0.3)
    if ops:
        axes[0].legend(fontsize=7, loc="upper left")
    if srows:
        ax = axes[-1]
        labels = [r["op"] for r in srows]
        ratios = [float(r["ratio_vs_plain"]) for r in srows]
        colors = ["tab:gray" if "plain" in lab else ("tab:green" if "direct" in lab else "tab:purple")
                  for lab in labels]
        ax.barh(range(len(srows)), ratios, color=colors)
        ax.set_yticks(range(len(srows)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        cpu = str(srows[0]["mode"]).startswith("cpu")
        targets = [(1.25, "direct ≤1.25 (CPU)"), (1.9, "full ≤1.9 (CPU)")] if cpu else \
            [(1.10, "direct ≤1.10"), (1.45, "full kfac ≤1.45")]
        for val, lab in targets:
            ax.axvline(val, linestyle="--", color="tab:red", alpha=0.6)
            ax.text(val, len(srows) - 0.5, lab, rotation=90, fontsize=6, va="bottom", ha="right")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("step time / plain SFT step (same rounds)")
        plain = next((r for r in srows if r["provider"] == "plain"), srows[0])
        ax.set_title("end to end: " + plain["note"].split(",")[0], fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
    runs = []  # one line per distinct environment (kernel and step rows may come from different runs)
    for r in rows:
        line = (f"{r['device']} | {r['date']} | torch {r['torch']} triton {r['triton']} "
                f"transformers {r['transformers']} | alphatoken {r['alphatoken']} ({r['git_rev']}) | {r['mode']}")
        if line not in runs:
            runs.append(line)
    fig.suptitle("\n".join(runs), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", help="CSV files written by gpu_bench.py / step_bench.py")
    p.add_argument("--out", default=None, help="image path (default: the first CSV with .png)")
    args = p.parse_args(argv)
    rows = []
    for path in args.csv:
        rows += C.read_csv(Path(path))
    out = Path(args.out) if args.out else Path(args.csv[0]).with_suffix(".png")
    print(plot(rows, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
