"""Round 18 read-out: the keep-0.6 precision / recall of the rules whose values depend on the keep ratio, as
detect.py now reports them (valued again at keep 0.6) against the same seeds' rows of an earlier CSV (valued at
keep 0.8 and cut at 0.6), and against every scorer that is not AlphaToken's, paired by seed.

    python benchmarks/quality/out_r18/keep_rescored.py NEW.csv [NEW2.csv ...] --before OLD.csv [OLD2.csv ...]
"""
import argparse
import csv
import statistics as st
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from frontier import paired  # noqa: E402


def read(paths):
    rows = {}
    for path in paths:
        for r in csv.DictReader(open(path)):
            rows[(r["world"], r["stage"], r["scorer"], int(r["seed"]))] = r
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--before", nargs="+", required=True)
    ap.add_argument("--keep", default="0.6")
    a = ap.parse_args(argv)
    new, old = read(a.csv), read(a.before)
    p, r = f"precision@{a.keep}", f"recall@{a.keep}"
    rules = sorted({k[2] for k in new if k[2].startswith("at_")})
    others = sorted({k[2] for k in new if not k[2].startswith("at_") and k[2] != "random"})
    columns = sorted({k[:2] for k in new}, key=lambda c: (c[0], c[1] != "theta0"))
    print(f"| rule | column | seeds | {p} now | {r} now | Δ precision vs before | Δ recall vs before | "
          f"best other by recall (its P / R) |")
    print("|---" * 8 + "|")
    for rule in rules:
        for w, s in columns:
            seeds = sorted(k[3] for k in new if k[:3] == (w, s, rule) and (w, s, rule, k[3]) in old)
            if not seeds:
                continue
            now = {x: (float(new[(w, s, rule, x)][p]), float(new[(w, s, rule, x)][r])) for x in seeds}
            before = {x: (float(old[(w, s, rule, x)][p]), float(old[(w, s, rule, x)][r])) for x in seeds}
            dp, dr = (paired(now, before, i) for i in (0, 1))
            best = max(others, key=lambda o: st.mean(float(new[(w, s, o, x)][r]) for x in seeds))
            bp = st.mean(float(new[(w, s, best, x)][p]) for x in seeds)
            br = st.mean(float(new[(w, s, best, x)][r]) for x in seeds)
            print(f"| {rule} | {w} {s} | {len(seeds)} | {st.mean(v[0] for v in now.values()):.3f} | "
                  f"{st.mean(v[1] for v in now.values()):.3f} | {dp[0]:+.3f} ± {dp[1]:.3f} | "
                  f"{dr[0]:+.3f} ± {dr[1]:.3f} | {best} ({bp:.3f} / {br:.3f}) |")


if __name__ == "__main__":
    main()
