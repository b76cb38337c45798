"""Round 20: probe.py's AUROCs (the p_*.csv files of a folder, default probe/) as one markdown table, mean ± std
over the seeds each column has.

    python benchmarks/quality/out_r20/fusion_table.py            # out_r20/fusion.md
"""
import csv
import glob
import statistics as st
import sys
from pathlib import Path

SCORERS = [
    ("at_dispval_all_copy0_floor2cap_order1_direct", "defaults"),
    ("grad_norm_low", "GraNd under the run's model"),
    ("ref_grad_norm_val", "GraNd under the validation copy (`ref_grad_norm_val`)"),
    ("el2n_val", "the validation copy's EL2N, −‖p_val − e_y‖"),
    ("featnorm_val", "the validation copy's feature norm, −‖h_val‖"),
    ("ref_loss_val", "the validation copy's loss"),
    ("ord+0.5:val", "defaults' order fused with the copy's GraNd, w 0.5 (mask kept)"),
    ("ord+1:val", "defaults' order fused with the copy's GraNd, w 1 (mask kept)"),
    ("def+0.5:val", "defaults' values rank-fused with the copy's GraNd, w 0.5 (mask moves)"),
    ("def+1:val", "defaults' values rank-fused with the copy's GraNd, w 1 (mask moves)"),
]


def main(folder):
    rows = [r for p in sorted(glob.glob(str(Path(folder) / "p_*.csv"))) for r in csv.DictReader(open(p))]
    cols = sorted({(r["world"], r["stage"]) for r in rows}, key=lambda c: (c[0], c[1] != "theta0"))
    cell = {}
    for r in rows:
        cell.setdefault((r["scorer"], r["world"], r["stage"]), []).append(float(r["auroc"]))
    print("| scorer | " + " | ".join(f"{w} {s} (n)" for w, s in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for key, label in SCORERS:
        out = []
        for w, s in cols:
            v = cell.get((key, w, s), [])
            out.append("–" if not v else f"{st.mean(v):.3f}" + (f" ± {st.stdev(v):.3f}" if len(v) > 1 else "")
                       + f" ({len(v)})")
        print(f"| {label} | " + " | ".join(out) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "probe")
