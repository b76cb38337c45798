"""Batching for the toy world: training batches (HF causal-LM labels) and left-padded generation prompts."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ..values import IGNORE_INDEX
from .tasks import Example


def _ids(tokenizer, text: str) -> List[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def collate(examples: Sequence[Example], tokenizer, return_noise: bool = False) -> Dict[str, torch.Tensor]:
    """A training batch: `<bos> prompt response <eos>`, **right**-padded with the pad token.

    Returns input_ids, attention_mask (0 on padding) and labels (B, T) long, with labels = input_ids on the
    response and its `<eos>` and -100 on `<bos>`, the prompt and padding (HF convention: the model shifts).
    return_noise=True adds `noise` (B, T) bool, True on the response positions that are low-value tokens
    (`Example.noise`); drop that key before calling a model or valuer.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    rows, labels, noise = [], [], []
    for ex in examples:
        prompt = [tokenizer.bos_token_id] + _ids(tokenizer, ex.prompt)
        response = _ids(tokenizer, ex.response) + [tokenizer.eos_token_id]
        if len(response) != len(ex.response) + 1:
            raise ValueError(f"response {ex.response!r} has characters outside the toy vocabulary")
        rows.append(prompt + response)
        labels.append([IGNORE_INDEX] * len(prompt) + response)
        flags = tuple(ex.noise) if ex.noise else (False,) * len(ex.response)
        noise.append([False] * len(prompt) + list(flags) + [False])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long),
        "labels": torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in labels], dtype=torch.long),
    }
    if return_noise:
        batch["noise"] = torch.tensor([r + [False] * (width - len(r)) for r in noise], dtype=torch.bool)
    return batch


def collate_prompts(examples: Sequence[Example], tokenizer) -> Dict[str, torch.Tensor]:
    """Generation inputs `<bos> prompt`, **left**-padded, with position_ids that start at 0 on each row."""
    rows = [[tokenizer.bos_token_id] + _ids(tokenizer, ex.prompt) for ex in examples]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
