"""Round 11's read-out: every method's mean target exact match and forgetting at one learning rate, and its
difference from a reference method paired by seed (mean ± standard error over the seeds both have).
A method's rows are matched by name and git-independent (rows of one method from several revisions mix).

    python benchmarks/quality/out_r11/paired.py CSV [CSV ...] --task capitals --lr 1e-4 --reference rho1 \
        [--rename OLD=NEW ...]
"""
import argparse
import csv
import statistics


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csvs", nargs="+")
    ap.add_argument("--task", required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--reference", default="rho1")
    ap.add_argument("--rename", nargs="*", default=[], help="OLD=NEW method names, e.g. alphatoken=round9 for "
                                                             "the older files' defaults")
    a = ap.parse_args()
    rows = {}
    for i, path in enumerate(a.csvs):
        rename = dict(item.split("=", 1) for item in a.rename if item.split("=", 1)[0].startswith(f"{i}:"))
        for r in csv.DictReader(open(path)):
            if r["task"] != a.task or abs(float(r["lr"]) - a.lr) > 1e-12:
                continue
            method = rename.get(f"{i}:{r['method']}", r["method"])
            rows[(method, int(r["seed"]))] = r
    methods = sorted({m for m, _ in rows}, key=lambda m: (m != a.reference, m))
    print(f"{a.task}, lr {a.lr:g}; Δ against {a.reference}, paired by seed (mean ± standard error)\n")
    print(f"| method | seeds | target EM | forgetting | Δ EM | Δ forgetting |\n|---|---|---|---|---|---|")
    for m in methods:
        seeds = sorted(s for mm, s in rows if mm == m)
        em = [float(rows[(m, s)]["target_exact_match"]) for s in seeds]
        fg = [float(rows[(m, s)]["forgetting"]) for s in seeds]
        paired = [s for s in seeds if (a.reference, s) in rows]
        cells = []
        for key in ("target_exact_match", "forgetting"):
            d = [float(rows[(m, s)][key]) - float(rows[(a.reference, s)][key]) for s in paired]
            cells.append("–" if m == a.reference or len(d) < 2 else
                         f"{statistics.mean(d):+.3f} ± {statistics.stdev(d) / len(d) ** 0.5:.3f} ({len(d)})")
        print(f"| {m} | {len(seeds)} | {statistics.mean(em):.3f} | {statistics.mean(fg):.3f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
