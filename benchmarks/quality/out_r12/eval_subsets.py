"""Round 12: exact match of real_finetune rows on the first n eval prompts (from the `eval_correct` digits), and the
difference from a reference method paired by seed, for several n at once.

    python benchmarks/quality/out_r12/eval_subsets.py A.csv B.csv ... --reference rho1 --n 30 120
      [--rename I:OLD=NEW]   (method OLD of the I-th file, 0-based, is read as NEW; the last file wins a method-seed)
"""
import argparse
import csv
import math
import statistics


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--reference", default="rho1")
    ap.add_argument("--n", type=int, nargs="+", default=[30, 120])
    ap.add_argument("--rename", nargs="*", default=[])
    a = ap.parse_args(argv)
    renames = {}
    for item in a.rename:
        index, _, pair = item.partition(":")
        old, _, new = pair.partition("=")
        renames[(int(index), old)] = new
    rows = {}
    for i, path in enumerate(a.files):
        for r in csv.DictReader(open(path)):
            if not r.get("eval_correct"):
                continue
            rows[(renames.get((i, r["method"]), r["method"]), int(r["seed"]))] = r
    methods = list(dict.fromkeys(m for m, _ in rows))
    for n in a.n:
        print(f"first {n} eval prompts")
        for m in methods:
            seeds = sorted(s for mm, s in rows if mm == m)
            em = {s: sum(c == "1" for c in rows[(m, s)]["eval_correct"][:n]) / n for s in seeds
                  if len(rows[(m, s)]["eval_correct"]) >= n}
            line = f"  {m:24s} {len(em):2d} seeds  EM {statistics.mean(em.values()):.3f}"
            if m != a.reference:
                diffs = [em[s] - sum(c == "1" for c in rows[(a.reference, s)]["eval_correct"][:n]) / n
                         for s in em if (a.reference, s) in rows]
                forget = [float(rows[(m, s)]["forgetting"]) - float(rows[(a.reference, s)]["forgetting"])
                          for s in em if (a.reference, s) in rows]
                if len(diffs) > 1:
                    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
                    fse = statistics.stdev(forget) / math.sqrt(len(forget))
                    line += (f"   vs {a.reference} ({len(diffs)} paired): Δ EM {statistics.mean(diffs):+.3f} ± {se:.3f},"
                             f" Δ forgetting {statistics.mean(forget):+.3f} ± {fse:.3f}")
            print(line)


if __name__ == "__main__":
    main()
