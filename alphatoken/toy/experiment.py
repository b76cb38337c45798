"""One fine-tuning run of the toy world per (method, seed), and the small `compare` the CLI demo calls.

A method is a `MethodSpec`: plain SFT ("full"), a baseline scorer from `alphatoken.scorers`, or AlphaToken with
config overrides and a Fisher kind. Every run starts from a fresh copy of the built-in model.
"""
from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Sequence

import torch

from .data import collate
from .evaluate import evaluate_tasks, exact_match
from .model import load_builtin
from .tasks import RETENTION_TASKS, TargetNoise, retention_eval_sets, target_data
from .train import finetune


@dataclass(frozen=True)
class MethodSpec:
    """What to fine-tune with.

    kind: "full" (every response token), "scorer" (`scorer` is a name for `alphatoken.scorers.make_scorer`)
        or "alphatoken".
    config: AlphaTokenConfig overrides (keep_ratio comes from the run unless given here).
    fisher: "diag", "kfac" or None (AlphaToken only; estimated on target training batches at θ₀).
    """

    name: str
    kind: str = "alphatoken"
    scorer: Optional[str] = None
    config: Dict = field(default_factory=dict)
    fisher: Optional[str] = "kfac"


# Defaults of the toy experiment (see benchmarks/quality/RESULTS.md for how they were chosen).
DEFAULTS = dict(steps=200, batch_size=64, lr=4e-4, n_train=2000, fisher_batches=8, fisher_batch_size=32)
# The configuration the quality rounds 1-3 ran their named AlphaToken methods on (benchmarks/quality/run.py):
# the library's defaults before the token-detection benchmark chose new ones (DESIGN §3.5).
ALPHATOKEN_DEFAULT = dict(stability_weight=1.0, causal_weight=1.0, paths="full", target="batch", normalize=True,
                          cosine=False, combine="linear")
# The library's own defaults for the same keys (what `AlphaTokenConfig()` gives).
LIBRARY_DEFAULT = dict(stability_weight=None, causal_weight=1.0, paths="auto", direct_layers="auto", target="auto",
                       normalize=False, cosine=True, combine="rank")
# What toy.compare (the CLI demo) runs on top of ALPHATOKEN_DEFAULT: the library's defaults, which with the toy's
# clean validation batch resolve to the tuned target with the loss gap's floor (DESIGN §3.5, §3.10; run.py's
# `at_auto`), <eos> (id 2 in the toy tokenizer) always kept. Until round 10 the demo ran the validation-target rule
# (run.py's `at_default`); at the toy's forgetting level the defaults learn more (benchmarks/quality/RESULTS.md).
COMPARE_CONFIG = dict(LIBRARY_DEFAULT, always_keep_token_ids=(2,))


def _strip(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}


def build_method(spec: MethodSpec, model, tokenizer, data, keep_ratio: float, seed: int,
                 fisher_batches: int = DEFAULTS["fisher_batches"],
                 fisher_batch_size: int = DEFAULTS["fisher_batch_size"], run_lr: Optional[float] = DEFAULTS["lr"]):
    """The object `finetune` trains with ("full" or a valuer/scorer bound to `model` at θ₀).

    run_lr: the fine-tune's AdamW learning rate; with the tuned target and tune_lr unset, the copy is tuned at it,
    as the trainer integrations tune it from the run's optimizer (DESIGN §3.6). None: the library's fallback."""
    if spec.kind == "full":
        return "full"
    import alphatoken as at

    cfg = at.AlphaTokenConfig(**{"keep_ratio": keep_ratio, **(ALPHATOKEN_DEFAULT if spec.kind == "alphatoken"
                                                                else {}), "tune_lr": run_lr, **spec.config})
    if spec.kind == "scorer":
        from ..scorers import make_scorer

        reference = None
        if spec.scorer in ("excess_loss", "rho1"):
            reference = copy.deepcopy(model).eval()
            for p in reference.parameters():
                p.requires_grad_(False)
        return make_scorer(spec.scorer, model, cfg, reference=reference, seed=seed)
    if spec.kind != "alphatoken":
        raise ValueError(f"unknown method kind {spec.kind!r}")
    fisher = None
    if spec.fisher is not None:
        n = min(len(data.train), fisher_batches * fisher_batch_size)
        fb = [collate(data.train[i:i + fisher_batch_size], tokenizer) for i in range(0, n, fisher_batch_size)]
        gen = torch.Generator(device="cpu").manual_seed(seed)
        fisher = at.estimate_fisher(model, fb, kind=spec.fisher, tracked_layers=cfg.tracked_layers,
                                    track_embeddings=cfg.track_embeddings, generator=gen, progress=False)
    validation = collate(data.validation, tokenizer) if cfg.target in ("validation", "auto") else None
    with warnings.catch_warnings():
        if fisher is None:  # stability-free by choice (e.g. adaptation-only): the engine's warning is noise here
            warnings.filterwarnings("ignore", message=".*fisher=None.*")
        return at.AlphaToken(model, cfg, fisher=fisher, reference=None, validation=validation)


_BEFORE_CACHE: Dict[tuple, dict] = {}


def accuracy_before(n_eval_retention: int = 200, n_eval_target: int = 300) -> dict:
    """Exact match of the untouched built-in model: {"target": acc, task: acc, ...} (cached)."""
    key = (n_eval_retention, n_eval_target)
    if key not in _BEFORE_CACHE:
        model, tokenizer = load_builtin()
        data = target_data(n_train=1, n_eval=n_eval_target, seed=0)
        acc = {"target": exact_match(model, tokenizer, data.eval)}
        acc.update(evaluate_tasks(model, tokenizer, retention_eval_sets(n_eval_retention)))
        _BEFORE_CACHE[key] = acc
    return dict(_BEFORE_CACHE[key])


def run_one(spec: MethodSpec, seed: int = 0, keep_ratio: float = 0.6, steps: int = DEFAULTS["steps"],
            batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"],
            n_train: int = DEFAULTS["n_train"], noise: Optional[TargetNoise] = None,
            n_eval_retention: int = 200, n_eval_target: int = 300, progress: bool = False,
            optimizer: str = "adamw", grad_clip: Optional[float] = 1.0) -> dict:
    """Fine-tune a fresh built-in model with `spec` on the noisy target task; evaluate on clean held-out data.

    Returns a flat dict: method, seed, keep_ratio, steps, target_exact_match, `<task>_before`, `<task>_after`,
    `<task>_drop` (before - after, the forgetting) per retention task, mean_drop, tokens_trained,
    response_tokens, keep_ratio_actual, noise_dropped_share, clean_dropped_share, wall_time (fine-tuning loop),
    setup_time (Fisher estimation, valuer construction), final_loss.
    """
    model, tokenizer = load_builtin()
    data = target_data(n_train=n_train, n_eval=n_eval_target, seed=seed, noise=noise)
    before = accuracy_before(n_eval_retention, n_eval_target)
    t0 = time.perf_counter()
    method = build_method(spec, model, tokenizer, data, keep_ratio, seed,
                          run_lr=lr if optimizer == "adamw" else None)
    setup = time.perf_counter() - t0
    try:
        stats = finetune(model, tokenizer, data.train, method, steps=steps, batch_size=batch_size, lr=lr,
                         seed=seed, progress=progress, optimizer=optimizer, grad_clip=grad_clip)
    finally:
        if hasattr(method, "close"):
            method.close()
    after = evaluate_tasks(model, tokenizer, retention_eval_sets(n_eval_retention))
    row = {"method": spec.name, "seed": seed, "keep_ratio": keep_ratio, "steps": steps,
           "target_exact_match": exact_match(model, tokenizer, data.eval), "target_before": before["target"]}
    for task in RETENTION_TASKS:
        row[f"{task}_before"] = before[task]
        row[f"{task}_after"] = after[task]
        row[f"{task}_drop"] = before[task] - after[task]
    row["mean_drop"] = statistics.mean(row[f"{t}_drop"] for t in RETENTION_TASKS)
    row.update({k: stats[k] for k in ("tokens_trained", "response_tokens", "noise_dropped_share",
                                      "clean_dropped_share", "wall_time")})
    row["keep_ratio_actual"] = stats["keep_ratio"]
    row["setup_time"] = setup
    row["final_loss"] = statistics.mean(stats["losses"][-10:])
    row["first_loss"] = stats["losses"][0]
    if stats.get("grad_norms"):
        row["mean_grad_norm"] = statistics.mean(stats["grad_norms"])
    return row


def summarize(rows: Sequence[dict]) -> dict:
    """Mean and (sample) std over seeds of every numeric field: {field: mean, field + "_std": std}."""
    out: dict = {}
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "seed":
            vals = [float(r[key]) for r in rows]
            out[key] = statistics.mean(vals)
            out[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def score_example(spec: MethodSpec, keep_ratio: float = 0.6, n: int = 8, seed: int = 0,
                  noise: Optional[TargetNoise] = None) -> dict:
    """The values a method gives `n` noisy target training examples at θ₀ (for reports).

    Returns {"texts": [prompt + response], "tokens": [[str per position]], "batch": {input_ids, attention_mask,
    labels} (CPU), "noise": (B, T) bool, "values": TokenValues on CPU}.
    """
    model, tokenizer = load_builtin()
    data = target_data(n_train=max(n, 64), seed=seed, noise=noise)
    examples = data.train[:n]
    batch = collate(examples, tokenizer, return_noise=True)
    noise_mask = batch.pop("noise")
    method = build_method(spec, model, tokenizer, data, keep_ratio, seed)
    try:
        values = method.value(batch).detach_cpu()
    finally:
        method.close()
    tokens = [tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()]
    return {"texts": [ex.prompt + ex.response for ex in examples], "tokens": tokens, "batch": batch,
            "noise": noise_mask, "values": values}


def compare(steps: int = DEFAULTS["steps"], seeds: Iterable[int] = (0,), keep_ratio: float = 0.8,
            progress: bool = True, fisher: str = "kfac", config: Optional[dict] = None,
            batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"],
            n_train: int = DEFAULTS["n_train"]) -> dict:
    """Fine-tune the built-in model on the noisy target task with every token and with AlphaToken; compare.

    AlphaToken uses `ALPHATOKEN_DEFAULT` updated with `COMPARE_CONFIG` (the library's defaults with the toy's clean
    validation batch, and <eos> always kept) and then with `config`, at keep 0.8. On six seeds (benchmarks/quality
    RESULTS.md, rounds 9-10) that halves forgetting for about 0.07 target exact match, which full SFT at the same
    forgetting (a lower learning rate) does not come near. And
    a `fisher` ("diag"/"kfac"/None) Fisher estimated at θ₀ on target training batches. About 90 s wall at the
    defaults on one thread (measured 2026-12-06, OMP_NUM_THREADS=1, next to two other jobs on 2 cores: 19.6 s
    fine-tuning on every token, 52.1 s with AlphaToken, the tuned copy included, the rest evaluation).

    Returns {
      "settings": {steps, seeds, keep_ratio, batch_size, lr, n_train, fisher, config (AlphaTokenConfig dict)},
      "before": {"target": acc, "add": acc, "copy": acc, "reverse": acc},     # the untouched built-in model
      "methods": {"full" | "alphatoken": {
          "target_exact_match": mean over seeds, "target_exact_match_std",
          "retention_before": {task: acc}, "retention_after": {task: mean acc}, "forgetting": {task: mean drop},
          "tokens_trained": mean, "response_tokens": mean, "noise_dropped_share": mean, "wall_time": mean s,
          "runs": [flat row per seed (see run_one)]}},
      "example": score_example(...) for AlphaToken: texts, tokens, batch, noise, values (TokenValues),
    }
    """
    import alphatoken as at

    seeds = tuple(seeds)
    config = {**COMPARE_CONFIG, **(config or {})}
    specs = [MethodSpec("full", kind="full"),
             MethodSpec("alphatoken", kind="alphatoken", config=dict(config), fisher=fisher)]
    before = accuracy_before()
    result = {"before": before, "methods": {}}
    for spec in specs:
        rows = []
        for seed in seeds:
            if progress:
                print(f"[alphatoken.toy] fine-tuning with {spec.name}, seed {seed}, {steps} steps", flush=True)
            rows.append(run_one(spec, seed=seed, keep_ratio=keep_ratio, steps=steps, batch_size=batch_size,
                                lr=lr, n_train=n_train, progress=progress))
        s = summarize(rows)
        result["methods"][spec.name] = {
            "target_exact_match": s["target_exact_match"], "target_exact_match_std": s["target_exact_match_std"],
            "retention_before": {t: before[t] for t in RETENTION_TASKS},
            "retention_after": {t: s[f"{t}_after"] for t in RETENTION_TASKS},
            "forgetting": {t: s[f"{t}_drop"] for t in RETENTION_TASKS},
            "tokens_trained": s["tokens_trained"], "response_tokens": s["response_tokens"],
            "noise_dropped_share": s["noise_dropped_share"], "wall_time": s["wall_time"], "runs": rows,
        }
        if progress:
            m = result["methods"][spec.name]
            forgetting = ", ".join(f"{t} {d:.3f}" for t, d in m["forgetting"].items())
            print(f"[alphatoken.toy] {spec.name}: target {m['target_exact_match']:.3f}, forgetting {forgetting}, "
                  f"tokens {m['tokens_trained']:.0f}, {m['wall_time']:.1f}s", flush=True)
    cfg = at.AlphaTokenConfig(**{"keep_ratio": keep_ratio, **ALPHATOKEN_DEFAULT, **(config or {})})
    result["settings"] = {"steps": steps, "seeds": list(seeds), "keep_ratio": keep_ratio,
                          "batch_size": batch_size, "lr": lr, "n_train": n_train, "fisher": fisher,
                          "config": cfg.to_dict()}
    result["example"] = score_example(specs[1], keep_ratio=keep_ratio, seed=seeds[0] if seeds else 0)
    return result
