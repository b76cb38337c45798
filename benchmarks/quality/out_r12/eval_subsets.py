"""Round 12: exact match of real_finetune rows on the first n eval prompts (from the `eval_correct` digits), and the
difference from a reference method paired by seed, for several n at once.

    python benchmarks/quality/out_r12/eval_subsets.py A.csv B.csv ... --reference rho1 --n 30 120
      [--rename I:OLD=NEW]   (method OLD of the I-th file, 0-based, is read as NEW; the last file wins a method-seed)
"""
import argparse
import csv
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from frontier import paired  # noqa: E402


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
        # method -> {seed: (exact match on the first n prompts, forgetting)}, for frontier.paired
        runs = {m: {s: (sum(c == "1" for c in r["eval_correct"][:n]) / n, float(r["forgetting"]))
                    for (mm, s), r in rows.items() if mm == m and len(r["eval_correct"]) >= n} for m in methods}
        print(f"first {n} eval prompts")
        for m in methods:
            line = f"  {m:24s} {len(runs[m]):2d} seeds  EM {statistics.mean(e for e, _ in runs[m].values()):.3f}"
            if m != a.reference:
                (em, se, count), (forget, fse, _) = (paired(runs[m], runs.get(a.reference, {}), i) for i in (0, 1))
                if count > 1:
                    line += (f"   vs {a.reference} ({count} paired): Δ EM {em:+.3f} ± {se:.3f},"
                             f" Δ forgetting {forget:+.3f} ± {fse:.3f}")
            print(line)


if __name__ == "__main__":
    main()
