"""Greedy decoding and exact-match accuracy for the toy world."""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence

import inspect

import torch

from .data import collate_prompts
from .tasks import Example


def _cache_argument(model) -> str:
    """The forward's name for the KV cache: `cache` (transformers >= 5.x deprecates `past_key_values`)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_decode(model, tokenizer, examples: Sequence[Example], max_new_tokens: int = 16,
                  batch_size: int = 256, use_cache: bool = True) -> List[str]:
    """The greedy continuation of each example's prompt, cut at the first `<eos>` (special tokens removed).

    Prompts are left-padded with explicit position_ids, so results do not depend on batch composition.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    out: List[str] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            enc = {k: v.to(device) for k, v in collate_prompts(chunk, tokenizer).items()}
            ids, mask, pos = enc["input_ids"], enc["attention_mask"], enc["position_ids"]
            generated = []
            done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
            past = None
            cache_arg = _cache_argument(model)
            step_ids, step_pos = ids, pos
            for _ in range(max_new_tokens):
                if use_cache:
                    res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                                use_cache=True, **{cache_arg: past})
                    past = getattr(res, cache_arg)
                else:
                    full = torch.cat([ids] + generated, dim=1) if generated else ids
                    full_pos = torch.cat([pos] + [pos[:, -1:] + i + 1 for i in range(len(generated))], dim=1)
                    res = model(input_ids=full, attention_mask=mask, position_ids=full_pos, use_cache=False)
                nxt = res.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(nxt)
                done |= nxt.squeeze(1) == eos
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                step_pos = pos[:, -1:] + len(generated)
                step_ids = nxt
                if bool(done.all()):
                    break
            gen = torch.cat(generated, dim=1).tolist()
            for row in gen:
                if eos in row:
                    row = row[:row.index(eos)]
                out.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def exact_match(model, tokenizer, examples: Sequence[Example], batch_size: int = 256) -> float:
    """Share of examples whose greedy output equals the clean `answer` exactly."""
    if not examples:
        return float("nan")
    max_new = max(len(ex.answer) for ex in examples) + 2
    preds = greedy_decode(model, tokenizer, examples, max_new_tokens=max_new, batch_size=batch_size)
    return sum(p == ex.answer for p, ex in zip(preds, examples)) / len(examples)


def evaluate_tasks(model, tokenizer, eval_sets: Mapping[str, Sequence[Example]]) -> Dict[str, float]:
    """Exact match per task: {task: accuracy}."""
    return {task: exact_match(model, tokenizer, exs) for task, exs in eval_sets.items()}
