"""Round 11's read-out: every method's mean target exact match and forgetting at one learning rate, and its
difference from a reference method paired by seed (mean ± standard error over the seeds both have).
A method's rows are matched by name and git-independent (rows of one method from several revisions mix; the last
file given wins a seed). Rows are read and paired by frontier.py's `_load_rows` and `paired`.

    python benchmarks/quality/out_r11/paired.py CSV [CSV ...] --task capitals --lr 1e-4 --reference rho1 \
        [--rename I:OLD=NEW ...]
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from frontier import _load_rows, paired  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csvs", nargs="+")
    ap.add_argument("--task", required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--reference", default="rho1")
    ap.add_argument("--rename", nargs="*", default=[], help="I:OLD=NEW, the method OLD of the I-th file (from 0) "
                                                             "read as NEW, e.g. 0:alphatoken=round9 for an older "
                                                             "file's defaults")
    a = ap.parse_args()
    rename = dict(item.split("=", 1) for item in a.rename)
    runs = {}  # method -> {seed: (exact match, forgetting, displacement)}
    for i, path in enumerate(a.csvs):
        for (method, lr), seeds in _load_rows([Path(path)], a.task).items():
            if abs(lr - a.lr) <= 1e-12:
                runs.setdefault(rename.get(f"{i}:{method}", method), {}).update(seeds)
    methods = sorted(runs, key=lambda m: (m != a.reference, m))
    print(f"{a.task}, lr {a.lr:g}; Δ against {a.reference}, paired by seed (mean ± standard error)\n")
    print("| method | seeds | target EM | forgetting | Δ EM | Δ forgetting |\n|---|---|---|---|---|---|")
    for m in methods:
        seeds = runs[m]
        cells = []
        for index in (0, 1):  # exact match, forgetting
            mean, se, n = paired(seeds, runs.get(a.reference, {}), index)
            cells.append("–" if m == a.reference or n < 2 else f"{mean:+.3f} ± {se:.3f} ({n})")
        print(f"| {m} | {len(seeds)} | {statistics.mean(e for e, _, _ in seeds.values()):.3f} | "
              f"{statistics.mean(f for _, f, _ in seeds.values()):.3f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
