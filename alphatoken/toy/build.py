"""Build the shipped built-in toy model: `python -m alphatoken.toy.build [--steps N] [--out DIR]`.

Pre-trains the tiny Llama from scratch on the clean retention mixture (add, copy, reverse) and saves weights,
config and tokenizer to alphatoken/toy/builtin/ (package data). Deterministic given the seed and thread count.
"""
from __future__ import annotations

import argparse
import json

import torch


def main(argv=None) -> dict:
    from .model import BUILTIN_DIR, build_model, pretrain, save_builtin
    from .tokenizer import build_tokenizer

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-smoothing", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(BUILTIN_DIR))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=args.seed)
    stats = pretrain(model, tokenizer, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     eval_every=1000, label_smoothing=args.label_smoothing)
    out = save_builtin(model, tokenizer, args.out)
    summary = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "label_smoothing": args.label_smoothing,
               "final_loss": sum(stats["losses"][-100:]) / 100, "wall_time_s": round(stats["wall_time"], 1),
               "retention_accuracy": stats["accuracy"]}
    (out / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
