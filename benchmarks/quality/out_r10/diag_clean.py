"""Prototype (round 10): which *clean* response tokens does each method drop while training, and are they the ones
the model already predicts well? Per method: the clean tokens' drop share, the mean per-token loss ℓ_t(θ) of the
dropped and of the kept clean tokens (at the step they were valued), and the clean token strings dropped most.
For the noise: the drop share of the first token of each run of noise tokens and of the later ones, and the mean
loss of the dropped and of the kept noise tokens.

    python benchmarks/quality/out_r10/diag_clean.py --task capitals --lr 1e-4 --seeds 0 --methods rho1,alphatoken
"""
import argparse
import copy
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from alphatoken import realtasks as R
from alphatoken.pretrained import load_pretrained
from alphatoken.tokens import token_losses

QUAL = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(QUAL))
from detect import set_trainable_blocks  # noqa: E402
import real_finetune as RF  # noqa: E402


def train(model, tokenizer, examples, method, args, seed):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    eot = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    dropped_loss, kept_loss, seen, dropped = [], [], Counter(), Counter()
    runs = Counter()  # noise tokens: (first of its run or later, dropped) -> count; and their loss
    noise_loss = {True: [], False: []}
    model.train()
    for step in range(args.steps):
        idx = torch.randint(len(examples), (args.batch_size,), generator=gen).tolist()
        batch = R.tokenize_examples([examples[i] for i in idx], tokenizer)
        noise = batch.pop("noise")
        if hasattr(method, "noise"):
            method.noise = noise
        response = batch["labels"] != -100
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses = token_losses(logits, batch["labels"])
        loss = method.value_and_loss(batch)
        kept = method.last_values.mask & response
        loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); opt.zero_grad(set_to_none=True)
        clean = response & ~noise & (batch["labels"] != eot)
        first = noise & response & ~torch.cat([torch.zeros_like(noise[:, :1]), noise[:, :-1]], dim=1)
        for where, name in ((first, "first"), (noise & response & ~first, "later")):
            runs[(name, True)] += int((where & ~kept).sum())
            runs[(name, False)] += int((where & kept).sum())
        noise_loss[True] += losses[noise & response & ~kept].tolist()
        noise_loss[False] += losses[noise & response & kept].tolist()
        dropped_loss += losses[clean & ~kept].tolist()
        kept_loss += losses[clean & kept].tolist()
        for b, t in clean.nonzero().tolist():
            s = tokenizer.decode([int(batch["labels"][b, t])])
            seen[s] += 1
            dropped[s] += int(not kept[b, t])
    model.eval()
    return dropped_loss, kept_loss, seen, dropped, runs, noise_loss


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="capitals")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", default="rho1,alphatoken")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=24)
    a = p.parse_args()
    torch.set_num_threads(1)
    args = argparse.Namespace(keep_ratio=0.8, train_blocks=4, steps=a.steps, batch_size=8, lr=a.lr, n_eval=30,
                              alphatoken_overrides={}, own_answers=None, retention=0, retention_short=[],
                              validation_retention=0, retention_tokens=8, retention_weight=1.0, fisher_data="train",
                              task=a.task)
    base, tok = load_pretrained("smollm2")
    for seed in a.seeds:
        for m in a.methods.split(","):
            model = copy.deepcopy(base)
            set_trainable_blocks(model, 4)
            data = R.task_data(a.task, n_train=256, n_validation=16, n_eval=30, seed=seed)
            runner = RF.build(m, model, tok, data, args, seed, torch.device("cpu"))
            t0 = time.time()
            d_loss, k_loss, seen, dropped, runs, noise_loss = train(model, tok, data.train, runner, args, seed)
            if hasattr(runner, "close"):
                runner.close()
            n = len(d_loss) + len(k_loss)
            mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
            top = sorted(dropped, key=lambda s: -dropped[s])[:10]
            print(f"[clean] {a.task} lr {a.lr:g} {m} seed {seed}: clean dropped {len(d_loss) / max(1, n):.3f}; "
                  f"mean ℓ(θ) dropped {mean(d_loss):.3f}, kept {mean(k_loss):.3f} ({time.time() - t0:.0f}s)", flush=True)
            share = lambda name: runs[(name, True)] / max(1, runs[(name, True)] + runs[(name, False)])  # noqa: E731
            print(f"    noise dropped: first token of a noise run {share('first'):.2f}, later tokens {share('later'):.2f}; "
                  f"mean ℓ(θ) of dropped noise {mean(noise_loss[True]):.2f}, kept noise {mean(noise_loss[False]):.2f}",
                  flush=True)
            print("    most dropped clean tokens (dropped / seen): "
                  + ", ".join(f"{s!r} {dropped[s]}/{seen[s]}" for s in top), flush=True)


if __name__ == "__main__":
    main()
