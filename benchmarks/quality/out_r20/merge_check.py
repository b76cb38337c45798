"""Round 20: merge detect.py CSVs run in parts (one header) and compare every (world, stage, seed, scorer) row that an
older CSV also has, on every metric, to the last digit.

    python benchmarks/quality/out_r20/merge_check.py OUT.csv out_r19/detect_toy.csv PART1.csv PART2.csv ...
"""
import csv, sys
out, old, *parts = sys.argv[1:]
rows = [r for p in parts for r in csv.DictReader(open(p))]
with open(out, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0])); w.writeheader(); w.writerows(rows)
prev = {(r["world"], r["stage"], r["seed"], r["scorer"]): r for r in csv.DictReader(open(old))}
keys = ["auroc", "precision@0.8", "recall@0.8", "precision@0.6", "recall@0.6"]
same = diff = new = 0
for r in rows:
    k = (r["world"], r["stage"], r["seed"], r["scorer"])
    if k not in prev:
        new += 1; continue
    if all(abs(float(r[c]) - float(prev[k][c])) < 1e-12 for c in keys):
        same += 1
    else:
        diff += 1; print("DIFF", k, r["auroc"], prev[k]["auroc"])
print(f"{len(rows)} rows: {same} equal to {old}, {diff} differ, {new} not in it")
