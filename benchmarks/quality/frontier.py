"""The real fine-tune's learning-rate frontier: each method against full SFT at *matched target accuracy*.

At one learning rate a masking method and full SFT move the model by about the same amount, so their forgetting
is about the same whatever tokens are kept (benchmarks/quality/RESULTS.md, rounds 4 and 9). What a user gets
from choosing tokens is a better trade-off between learning the task and forgetting: the same exact match for
less forgetting. This read-out takes the rows of `real_finetune.py` at several `--lr` (any number of CSVs) and,
per task, answers two questions for every method and learning rate:

* **matched accuracy**: for each full-SFT learning rate, the method's run (of every learning rate it has) that
  forgets least among those whose mean exact match is at least full's minus `--tolerance` (0.02, issue 10's
  "within 0.02"); its forgetting minus full's, paired by seed (the seed fixes the data and the batch order at
  every learning rate), mean ± standard error.
* **curve gap**: the method's mean exact match minus full SFT's learning-rate curve at the method's mean
  forgetting (linear between the curve's points, blank outside them), as `compare.py` does for the toy.

`--reference rho1` reads every method against Rho-1's learning-rate curve instead of full SFT's. Where the rows
carry it (real_finetune.py since round 10), the first table also gives each run's mean displacement ‖θ − θ₀‖ of
the trained weights: how far the model moved, which sets most of the forgetting at one learning rate.

    python benchmarks/quality/frontier.py benchmarks/quality/out_r10/capitals_lr*.csv --task capitals

Rows are deduplicated by (method, seed, lr): the last file given wins.
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path


def load(paths, task: str) -> dict:
    """{(method, lr): {seed: (exact match, forgetting)}} for `task`."""
    return _points(_load_rows(paths, task))


def load_displacement(paths, task: str) -> dict:
    """{(method, lr): {seed: ‖θ − θ₀‖}} for `task`, from the rows that carry it (real_finetune.py since round 10)."""
    return _displacement(_load_rows(paths, task))


def _points(rows: dict) -> dict:
    return {key: {seed: point[:2] for seed, point in seeds.items()} for key, seeds in rows.items()}


def _displacement(rows: dict) -> dict:
    out = {}
    for key, seeds in rows.items():
        moved = {seed: point[2] for seed, point in seeds.items() if not math.isnan(point[2])}
        if moved:
            out[key] = moved
    return out


def _load_rows(paths, task: str) -> dict:
    runs = defaultdict(dict)
    for path in paths:
        for row in csv.DictReader(open(path)):
            if row.get("task", task) != task:
                continue
            key = (row["method"], float(row["lr"]))
            moved = float(row["displacement"]) if row.get("displacement") not in (None, "") else float("nan")
            runs[key][int(float(row["seed"]))] = (float(row["target_exact_match"]), float(row["forgetting"]), moved)
    return dict(runs)


def mean_point(seeds: dict) -> tuple:
    """(mean exact match, mean forgetting) over seeds."""
    return statistics.mean(e for e, _ in seeds.values()), statistics.mean(f for _, f in seeds.values())


def curve(runs: dict, reference: str = "full") -> list:
    """(mean forgetting, mean exact match) of the reference at every learning rate, sorted by forgetting."""
    return sorted((mean_point(s)[1], mean_point(s)[0]) for (m, _), s in runs.items() if m == reference)


def curve_at(points: list, forgetting: float) -> float:
    """The curve's exact match at `forgetting`, linear between its points; nan outside them."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= forgetting <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (forgetting - x0) / (x1 - x0)
    return float("nan")


def paired(a: dict, b: dict, index: int) -> tuple:
    """mean ± standard error over the seeds both ran of a[seed][index] − b[seed][index]; (nan, nan, 0) if none."""
    diffs = [a[s][index] - b[s][index] for s in sorted(set(a) & set(b))]
    if not diffs:
        return float("nan"), float("nan"), 0
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), se, len(diffs)


def matched(runs: dict, method: str, full_lr: float, tolerance: float, reference: str = "full"):
    """The method's least-forgetting learning rate among those whose mean exact match is at least the reference's
    at `full_lr` minus `tolerance`; None when none is."""
    target = mean_point(runs[(reference, full_lr)])[0] - tolerance
    ok = [(mean_point(s)[1], lr) for (m, lr), s in runs.items() if m == method and mean_point(s)[0] >= target - 1e-12]
    return min(ok)[1] if ok else None


def fmt(mean: float, se: float) -> str:
    return "–" if math.isnan(mean) else f"{mean:+.3f} ± {se:.3f}" if not math.isnan(se) else f"{mean:+.3f}"


def tables(runs: dict, tolerance: float = 0.02, reference: str = "full", displacement: dict = None) -> str:
    """The per-run table (with the curve gap, and the mean displacement where `displacement` has it) and the
    matched-accuracy table, both against `reference`'s learning-rate curve."""
    displacement = displacement or {}
    methods = list(dict.fromkeys(m for m, _ in sorted(runs, key=lambda k: (k[0] != reference, k[0], k[1]))))
    lines = [f"| method | lr | seeds | target EM | forgetting | ‖θ − θ₀‖ | EM − {reference}'s lr curve at this "
             "forgetting |", "|---|---|---|---|---|---|---|"]
    points = curve(runs, reference)
    for m in methods:
        for lr in sorted(lr for mm, lr in runs if mm == m):
            seeds = runs[(m, lr)]
            em, fo = mean_point(seeds)
            gap = "" if m == reference else fmt(em - curve_at(points, fo), float("nan"))
            moved = displacement.get((m, lr))
            moved = f"{statistics.mean(moved.values()):.3f}" if moved else ""
            lines.append(f"| {m} | {lr:g} | {len(seeds)} | {em:.3f} | {fo:.3f} | {moved} | {gap.replace('–', '')} |")
    lines += ["", f"Matched accuracy (exact match at least {reference}'s − {tolerance:g}; the method's least-forgetting "
              "learning rate; paired by seed):", "",
              f"| {reference} lr | {reference} EM / forgetting | method | its lr | EM / forgetting | Δ EM | Δ forgetting |",
              "|---|---|---|---|---|---|---|"]
    for full_lr in sorted(lr for m, lr in runs if m == reference):
        fem, ffo = mean_point(runs[(reference, full_lr)])
        for m in methods:
            if m == reference:
                continue
            lr = matched(runs, m, full_lr, tolerance, reference)
            if lr is None:
                lines.append(f"| {full_lr:g} | {fem:.3f} / {ffo:.3f} | {m} | none within {tolerance:g} | | | |")
                continue
            em, fo = mean_point(runs[(m, lr)])
            d_em = paired(runs[(m, lr)], runs[(reference, full_lr)], 0)
            d_fo = paired(runs[(m, lr)], runs[(reference, full_lr)], 1)
            lines.append(f"| {full_lr:g} | {fem:.3f} / {ffo:.3f} | {m} | {lr:g} | {em:.3f} / {fo:.3f} | "
                         f"{fmt(*d_em[:2])} | {fmt(*d_fo[:2])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csvs", nargs="+", help="results.csv files of real_finetune.py (several learning rates)")
    parser.add_argument("--task", default="capitals")
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--reference", default="full", help="the method whose learning-rate curve the others are "
                        "read against (full; rho1 for AlphaToken against Rho-1 at matched accuracy)")
    parser.add_argument("--out", default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    rows = _load_rows([Path(p) for p in args.csvs], args.task)
    runs = _points(rows)
    if not any(m == args.reference for m, _ in runs):
        parser.error(f"no rows of the reference method {args.reference!r} for task {args.task!r} in the CSVs")
    text = tables(runs, args.tolerance, args.reference, _displacement(rows))
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
