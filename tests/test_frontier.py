"""The real fine-tune's learning-rate frontier read-out (benchmarks/quality/frontier.py) against brute force."""
import csv
import math
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))

import frontier  # noqa: E402


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "seed", "task", "lr", "target_exact_match", "forgetting"])
        w.writeheader()
        w.writerows(rows)


def test_points_on_a_line_above_the_curve_give_their_offset(tmp_path):
    rng = random.Random(5)
    slope, offset = rng.uniform(2, 6), rng.uniform(0.05, 0.2)
    rows = []
    for lr, f in ((5e-5, 0.01), (1e-4, 0.03), (2e-4, 0.06)):
        for seed in range(3):
            jitter = rng.uniform(-0.002, 0.002)
            rows.append(dict(method="full", seed=seed, task="capitals", lr=lr, forgetting=f + jitter,
                             target_exact_match=slope * (f + jitter)))
            rows.append(dict(method="other", seed=seed, task="reverse", lr=lr, forgetting=1, target_exact_match=0))
    f_m = rng.uniform(0.015, 0.05)
    rows += [dict(method="m", seed=s, task="capitals", lr=1e-4, forgetting=f_m, target_exact_match=slope * f_m + offset)
             for s in range(3)]
    _write(tmp_path / "a.csv", rows)
    runs = frontier.load([tmp_path / "a.csv"], "capitals")
    assert set(runs) == {("full", 5e-5), ("full", 1e-4), ("full", 2e-4), ("m", 1e-4)}  # the other task left out
    points = frontier.curve(runs)
    assert abs(frontier.curve_at(points, f_m) - slope * f_m) < 1e-9
    assert math.isnan(frontier.curve_at(points, 0.5))  # outside the curve
    text = frontier.tables(runs)
    assert f"+{offset:.3f}" in text


def test_matched_accuracy_picks_the_least_forgetting_run_that_is_accurate_enough_and_pairs_by_seed(tmp_path):
    rng = random.Random(9)
    rows = []
    full = {s: (rng.uniform(0.6, 0.7), rng.uniform(0.05, 0.07)) for s in range(4)}
    rows += [dict(method="full", seed=s, task="t", lr=2e-4, target_exact_match=e, forgetting=f)
             for s, (e, f) in full.items()]
    runs_m = {}
    for lr in (2.5e-5, 5e-5, 1e-4):
        runs_m[lr] = {s: (rng.uniform(0.3, 0.9), rng.uniform(0.0, 0.05)) for s in range(4)}
        rows += [dict(method="m", seed=s, task="t", lr=lr, target_exact_match=e, forgetting=f)
                 for s, (e, f) in runs_m[lr].items()]
    _write(tmp_path / "b.csv", rows)
    runs = frontier.load([tmp_path / "b.csv"], "t")
    full_em = statistics.mean(e for e, _ in full.values())
    eligible = [lr for lr, s in runs_m.items() if statistics.mean(e for e, _ in s.values()) >= full_em - 0.02]
    best = min(eligible, key=lambda lr: statistics.mean(f for _, f in runs_m[lr].values())) if eligible else None
    assert frontier.matched(runs, "m", 2e-4, 0.02) == best
    diffs = [runs_m[1e-4][s][1] - full[s][1] for s in range(4)]
    mean, se, n = frontier.paired(runs[("m", 1e-4)], runs[("full", 2e-4)], 1)
    assert n == 4 and abs(mean - statistics.mean(diffs)) < 1e-12
    assert abs(se - statistics.stdev(diffs) / 2) < 1e-12
    assert frontier.matched(runs, "m", 2e-4, -1.0) is None  # asks for more than any run reached


def test_another_reference_and_the_displacement_column(tmp_path):
    rng = random.Random(13)
    rows, moved = [], {}
    for method in ("full", "rho1", "m"):
        for lr in (5e-5, 1e-4):
            for seed in range(3):
                d = rng.uniform(0.5, 2.0)
                moved.setdefault((method, lr), []).append(d)
                rows.append(dict(method=method, seed=seed, task="t", lr=lr, target_exact_match=rng.uniform(0.2, 0.9),
                                 forgetting=rng.uniform(0.0, 0.05), displacement=d))
    rows.append(dict(method="old", seed=0, task="t", lr=1e-4, target_exact_match=0.5, forgetting=0.01,
                     displacement=""))  # a row from before the field existed
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    paths = [tmp_path / "c.csv"]
    runs, displacement = frontier.load(paths, "t"), frontier.load_displacement(paths, "t")
    assert ("old", 1e-4) in runs and ("old", 1e-4) not in displacement
    for key, values in moved.items():
        assert abs(statistics.mean(displacement[key].values()) - statistics.mean(values)) < 1e-12
    text = frontier.tables(runs, reference="rho1", displacement=displacement)
    assert "rho1 lr | rho1 EM / forgetting" in text and "| full |" in text
    m_row = next(line for line in text.splitlines() if line.startswith("| m | 0.0001 |"))
    assert f"{statistics.mean(moved[('m', 1e-4)]):.3f}" in m_row
    rho1_em = statistics.mean(e for e, _ in runs[("rho1", 1e-4)].values())
    lr = frontier.matched(runs, "m", 1e-4, 0.02, reference="rho1")
    eligible = [l for l in (5e-5, 1e-4) if statistics.mean(e for e, _ in runs[("m", l)].values()) >= rho1_em - 0.02]
    assert (lr is None) == (not eligible)
