"""Round 12: one AlphaToken rule against the best other (non-AlphaToken) scorer of each detection column, paired by
seed, from a detect.py CSV; the AlphaToken rules' means beside it.

    python benchmarks/quality/out_r12/paired_detect.py benchmarks/quality/out_r12/detect_toy.csv \
        at_dispval_all_agree3_direct [--exclude rho1_clean,rho1_clean_cos]
"""
import argparse
import csv
import math
import statistics as st


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("rule")
    ap.add_argument("--exclude", default="", help="comma list of scorers left out of 'best other' (e.g. oracles)")
    a = ap.parse_args(argv)
    rows = list(csv.DictReader(open(a.csv)))
    by = {(r["world"], r["stage"], r["scorer"], int(r["seed"])): float(r["auroc"]) for r in rows}
    scorers = {r["scorer"] for r in rows}
    others = sorted(s for s in scorers if not s.startswith("at_") and s not in a.exclude.split(","))
    columns = sorted({(r["world"], r["stage"]) for r in rows}, key=lambda x: (x[0], x[1] != "theta0"))
    for world, stage in columns:
        seeds = sorted(s for (w, g, sc, s) in by if w == world and g == stage and sc == a.rule)
        mean = lambda sc: st.mean(by[(world, stage, sc, s)] for s in seeds)  # noqa: E731
        best = max(others, key=mean)
        diffs = [by[(world, stage, a.rule, s)] - by[(world, stage, best, s)] for s in seeds]
        se = st.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        rules = " ".join(f"{sc}={mean(sc):.3f}" for sc in sorted(s for s in scorers if s.startswith("at_")))
        print(f"{world:13s} {stage:6s} {len(seeds):2d} seeds  {a.rule} {mean(a.rule):.3f}  best other {best} "
              f"{mean(best):.3f}  Δ {st.mean(diffs):+.4f} ± {se:.4f}   | {rules}")


if __name__ == "__main__":
    main()
