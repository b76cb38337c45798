"""Round 18 read-out: two real_finetune.py CSVs (or sets of them) paired by seed, per method: Δ of target exact
match, forgetting and the shares of noise and clean tokens dropped (mean ± standard error over the seeds both hold).

    python benchmarks/quality/out_r18/paired_finetune.py --a A.csv [A2.csv ...] --b B.csv [B2.csv ...] \
        [--method-a alphatoken] [--method-b alphatoken]
"""
import argparse
import csv
import statistics as st
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from frontier import paired  # noqa: E402

FIELDS = ("target_exact_match", "forgetting", "noise_dropped_share", "clean_dropped_share")


def read(paths, method):
    return {int(r["seed"]): r for path in paths for r in csv.DictReader(open(path)) if r["method"] == method}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", nargs="+", required=True)
    ap.add_argument("--b", nargs="+", required=True)
    ap.add_argument("--method-a", default="alphatoken")
    ap.add_argument("--method-b", default="alphatoken")
    a = ap.parse_args(argv)
    rows_a, rows_b = read(a.a, a.method_a), read(a.b, a.method_b)
    seeds = sorted(set(rows_a) & set(rows_b))
    print(f"{len(seeds)} seeds paired: {seeds}")
    for field in FIELDS:
        xa = {s: (float(rows_a[s][field]),) for s in seeds}
        xb = {s: (float(rows_b[s][field]),) for s in seeds}
        diff, se, _ = paired(xa, xb, 0)
        mean_a, mean_b = (st.mean(v[0] for v in x.values()) for x in (xa, xb))
        print(f"{field:22s} A {mean_a:.4f}  B {mean_b:.4f}  A − B {diff:+.4f} ± {se:.4f}")


if __name__ == "__main__":
    main()
