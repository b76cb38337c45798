"""Round 12: where the first-order value's false positives at θ₀ sit. For each toy world, the clean tokens it ranks in
its lowest fifth: their gap, loss, and whether they follow a noise token or share a sequence with noise.

    python benchmarks/quality/out_r12/false_positives.py DUMP_FOLDER toy-copy,toy-reverse,toy-add
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explore import cands  # noqa: E402
from alphatoken.combine import percentile_rank  # noqa: E402


def main(folder, worlds, seeds=(0, 1, 2)):
    for world in worlds.split(","):
        cols = {k: [] for k in ("rank", "noise", "after", "noisy_seq", "gap", "loss")}
        for seed in seeds:
            for r in torch.load(Path(folder) / f"{world}_s{seed}_theta0.pt", weights_only=False):
                scores, noise = cands(r)
                resp, scored = r["response"], r["scored"][r["response"]]
                flagged = r["noise"] & r["scored"]
                after = torch.zeros_like(flagged)
                after[:, 1:] = flagged[:, :-1]
                noisy_seq = flagged.any(1, keepdim=True).expand_as(flagged)
                cols["rank"].append(percentile_rank(scores["cos"][scored]))
                cols["noise"].append(noise[scored])
                cols["after"].append((after & ~flagged)[resp][scored])
                cols["noisy_seq"].append(noisy_seq[resp][scored])
                cols["gap"].append(scores["G"][scored])
                cols["loss"].append(-scores["loss_low"][scored])
        c = {k: torch.cat(v) for k, v in cols.items()}
        fp = ~c["noise"] & (c["rank"] < 0.2)
        print(f"{world}: {int(fp.sum())} clean tokens in the first-order value's lowest fifth; gap median "
              f"{c['gap'][fp].median():+.2f}, loss median {c['loss'][fp].median():.2f}; right after a noise token "
              f"{c['after'][fp].double().mean():.2f} (all clean: {c['after'][~c['noise']].double().mean():.2f}); "
              f"in a sequence with noise {c['noisy_seq'][fp].double().mean():.2f} "
              f"(all clean: {c['noisy_seq'][~c['noise']].double().mean():.2f})")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
