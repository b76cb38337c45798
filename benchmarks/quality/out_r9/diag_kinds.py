"""Which kinds of response tokens (filler / other noise / clean) does each method drop while training, and what do
the trained models open general answers with? Reverse or capitals, seeds given."""
import copy, sys, time, argparse, warnings
from pathlib import Path
import torch
sys.path.insert(0, str(Path(sys.argv[0]).resolve().parent))
import alphatoken as at
from alphatoken import realtasks as R
from alphatoken.pretrained import load_pretrained
from alphatoken.scorers import make_scorer
QUAL = Path(at.__file__).resolve().parent.parent / "benchmarks" / "quality"
sys.path.insert(0, str(QUAL))
from detect import set_trainable_blocks
import real_finetune as RF

FILLER = R.RealNoise().filler

def kinds(examples, tokenizer, width):
    out = []
    eot = R.end_of_turn(tokenizer)
    for ex in examples:
        prefix = R.chat_prefix(tokenizer, ex.prompt)
        enc = tokenizer(prefix + ex.response + eot, add_special_tokens=False, return_offsets_mapping=True)
        start = len(prefix)
        nf = len(FILLER) if ex.response.startswith(FILLER) else 0
        row = []
        for lo, hi in enc["offset_mapping"]:
            if hi <= start:
                row.append("p"); continue
            lo_r, hi_r = max(lo, start) - start, min(hi, start + len(ex.response)) - start
            chars = [i for i in range(lo_r, hi_r) if not ex.response[i].isspace()] or list(range(lo_r, hi_r))
            if not chars:
                row.append("e")
            elif all(i < nf for i in chars):
                row.append("S" if 0 in chars else "F")
            elif any(ex.noise[i] for i in chars):
                row.append("N")
            else:
                row.append("c")
        out.append(row + ["p"] * (width - len(row)))
    return out

def train(model, tokenizer, examples, method, args, seed):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    c = {k: [0, 0] for k in "SFNce"}
    model.train()
    for step in range(args.steps):
        idx = torch.randint(len(examples), (args.batch_size,), generator=gen).tolist()
        exs = [examples[i] for i in idx]
        batch = R.tokenize_examples(exs, tokenizer); batch.pop("noise")
        kk = kinds(exs, tokenizer, batch["input_ids"].shape[1])
        response = batch["labels"] != -100
        if method == "full":
            loss = model(**batch).loss; kept = response
        else:
            loss = method.value_and_loss(batch); kept = method.last_values.mask & response
        loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); opt.zero_grad(set_to_none=True)
        for b, row in enumerate(kk):
            for t, k in enumerate(row):
                if args.show_openings and k == "S" and method != "full" and response[b, t]:
                    tot = method.last_values.total[b][response[b]]
                    r = float((tot < method.last_values.total[b, t]).float().mean())
                    allr = method.last_values.total[response]
                    print(f"  step {step} S kept {bool(kept[b, t])} value {float(method.last_values.total[b, t]):+.3f} rank-in-batch {float((allr < method.last_values.total[b, t]).float().mean()):.2f} loss-free adapt {float(method.last_values.parts['adaptation_direct'][b, t]):+.4f}", flush=True)
                if k in c and response[b, t]:
                    c[k][0] += 1; c[k][1] += int(not kept[b, t])
    model.eval()
    return {k: v[1] / max(1, v[0]) for k, v in c.items()}

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="reverse"); p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", default="alphatoken_tuned,rho1"); p.add_argument("--steps", type=int, default=24)
    p.add_argument("--lr", type=float, default=2e-4); p.add_argument("--set", nargs="*", default=[])
    p.add_argument("--show-openings", action="store_true", help="print each filler opening's rank and fate per step")
    a = p.parse_args()
    torch.set_num_threads(1)
    args = argparse.Namespace(keep_ratio=0.8, train_blocks=4, steps=a.steps, batch_size=8, lr=a.lr, n_eval=30,
                              alphatoken_overrides=RF.parse_overrides(a.set), own_answers=None, retention=0,
                              retention_short=[], validation_retention=0, retention_tokens=8, retention_weight=1.0, fisher_data="train", task=a.task,
                              show_openings=a.show_openings)
    base, tok = load_pretrained("smollm2")
    answers = R.reference_answers(base, tok)
    base_nll = R.answers_nll(base, tok, answers)
    for seed in a.seeds:
        for m in a.methods.split(","):
            model = copy.deepcopy(base); set_trainable_blocks(model, 4)
            data = R.task_data(a.task, n_train=256, n_validation=16, n_eval=30, seed=seed)
            runner = RF.build(m, model, tok, data, args, seed, torch.device("cpu"))
            t0 = time.time()
            drops = train(model, tok, data.train, runner, args, seed)
            if hasattr(runner, "close"): runner.close()
            em = R.exact_match(model, tok, data.eval)
            forg = R.answers_nll(model, tok, answers) - base_nll
            opens = R.generate(model, tok, list(R.GENERAL_PROMPTS[:8]), max_new_tokens=8)
            sure = sum(o.startswith("Sure") or "Here you go" in o for o in R.generate(model, tok, list(R.GENERAL_PROMPTS), max_new_tokens=8))
            print(f"[diag] {a.task} {m} seed {seed}: EM {em:.3f} forg {forg:+.3f} drop S {drops['S']:.2f} F {drops['F']:.2f} N {drops['N']:.2f} "
                  f"c {drops['c']:.2f} e {drops['e']:.2f}; filler-openings {sure}/{len(R.GENERAL_PROMPTS)} {time.time()-t0:.0f}s", flush=True)
            print("   ", opens[:4], flush=True)

main()
