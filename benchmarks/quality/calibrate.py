"""Calibration runs (full-token SFT only) for the quality experiment: find a regime where full SFT learns part of
the target and forgets part of the retention tasks. Every run is appended to <out>/calibration.csv.

    python benchmarks/quality/calibrate.py --grid '[{"optimizer": "sgdm", "lr": 0.05, "steps": 200}]'
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import append_row  # noqa: E402

from alphatoken.toy.experiment import MethodSpec, run_one  # noqa: E402
from alphatoken.toy.tasks import TargetNoise  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--grid", required=True, help="JSON list of settings: optimizer, lr, steps, batch_size, "
                                                 "grad_clip, n_train, noise (dict), seed, method")
    p.add_argument("--out", default=str(HERE / "out_r2"))
    p.add_argument("--model-dir", default=None, help="another build of the toy model (default: the built-in one)")
    a = p.parse_args(argv)
    if a.model_dir:
        import os

        os.environ["ALPHATOKEN_TOY_MODEL_DIR"] = str(Path(a.model_dir).resolve())
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for s in json.loads(a.grid):
        s = {"optimizer": "sgdm", "lr": 0.05, "steps": 200, "batch_size": 16, "grad_clip": 1.0, "n_train": 2000,
             "noise": None, "seed": 0, "model_dir": a.model_dir or "builtin", **s}
        noise = TargetNoise(**s["noise"]) if s["noise"] else None
        t0 = time.perf_counter()
        row = run_one(MethodSpec("full", kind="full"), seed=s["seed"], keep_ratio=1.0, steps=s["steps"],
                      batch_size=s["batch_size"], lr=s["lr"], n_train=s["n_train"], noise=noise,
                      optimizer=s["optimizer"], grad_clip=s["grad_clip"])
        keep = {k: row[k] for k in ("target_exact_match", "add_drop", "copy_drop", "reverse_drop", "mean_drop",
                                    "first_loss", "final_loss", "mean_grad_norm", "wall_time") if k in row}
        rec = {**{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in s.items()}, **keep,
               "total_time": time.perf_counter() - t0}
        append_row(out / "calibration.csv", rec)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)


if __name__ == "__main__":
    main()
