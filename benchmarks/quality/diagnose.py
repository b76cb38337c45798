"""Why a method wins or loses: what each selection drops at θ₀ (the built-in model), by kind of token.

For every method, values `--batches` target training batches at θ₀ and reports the share of each token kind
that is dropped — filler (boilerplate), other noise (systematic swap or random corruption), clean answer
tokens, and <eos> — plus the Pearson correlation of the method's score with the token's own loss ℓ_t.
No training, so it runs in a minute:

    python benchmarks/quality/diagnose.py --methods all --out benchmarks/quality/out/diagnose.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import METHODS, VARIANTS, parse_set, resolve_methods  # noqa: E402

from alphatoken.scorers import token_losses  # noqa: E402
from alphatoken.toy import collate, load_builtin, target_data  # noqa: E402
from alphatoken.toy.experiment import build_method  # noqa: E402
from alphatoken.toy.tasks import TargetNoise  # noqa: E402


def kinds(examples, batch, noise: TargetNoise):
    """(B, T) int: 0 clean answer, 1 filler, 2 other noise, 3 eos, -1 not a response token."""
    labels = batch["labels"]
    out = torch.full(labels.shape, -1, dtype=torch.long)
    for b, ex in enumerate(examples):
        start = int((labels[b] != -100).nonzero()[0])
        n_filler = len(noise.filler) if ex.response.startswith(noise.filler) and ex.noise[0] else 0
        for i, flag in enumerate(ex.noise):
            out[b, start + i] = 1 if i < n_filler else (2 if flag else 0)
        out[b, start + len(ex.response)] = 3
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--methods", default="all")
    parser.add_argument("--keep-ratio", type=float, default=0.6)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--keep-eos", action="store_true", help="every method always keeps <eos>")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    noise = TargetNoise()
    keep_ids = (2,) if args.keep_eos else ()  # the toy tokenizer's <eos> id
    specs = [s for s in resolve_methods(args.methods, parse_set(args.set), "", keep_ids) if s.kind != "full"]
    lines = ["| method | clean dropped | filler dropped | swap/corrupt dropped | eos dropped | corr(score, ℓ) |",
             "|---|---|---|---|---|---|"]
    for spec in specs:
        model, tokenizer = load_builtin()
        data = target_data(n_train=args.batches * args.batch_size, seed=0)
        method = build_method(spec, model, tokenizer, data, args.keep_ratio, seed=0)
        dropped = torch.zeros(4)
        count = torch.zeros(4)
        scores, losses = [], []
        for i in range(args.batches):
            exs = data.train[i * args.batch_size:(i + 1) * args.batch_size]
            batch = collate(exs, tokenizer)
            kind = kinds(exs, batch, noise)
            tv = method.value(batch)
            with torch.no_grad():
                loss = token_losses(model(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"]).logits, batch["labels"])
            resp = tv.response
            for k in range(4):
                sel = resp & (kind == k)
                count[k] += sel.sum()
                dropped[k] += (sel & ~tv.mask).sum()
            scores.append(tv.total[resp].float())
            losses.append(loss[resp])
        method.close() if hasattr(method, "close") else None
        s, l_ = torch.cat(scores), torch.cat(losses)
        corr = float(torch.corrcoef(torch.stack([s, l_]))[0, 1]) if s.std() > 0 else float("nan")
        share = (dropped / count.clamp(min=1)).tolist()  # kinds 0..3: clean, filler, swap/corrupt, eos
        lines.append(f"| {spec.name} | " + " | ".join(f"{v:.2f}" for v in share) + f" | {corr:+.2f} |")
        print(lines[-1], flush=True)
    text = (f"keep_ratio={args.keep_ratio}, keep_eos={args.keep_eos}, {args.batches}x{args.batch_size} target "
            f"training examples, at θ₀\n\n")
    text += "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
