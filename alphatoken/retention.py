"""A retention batch: what the model already says, for the validation target's U (DESIGN §3.8).

With the validation target, U = ∇L_val + μ·∇L_ret. The retention batch needs no external data: the model's own
greedy answers to general prompts, before fine-tuning, are what it should keep saying. `own_answers` builds that
batch (the first `max_new_tokens` tokens of each answer; an answer cut short has no end-of-turn label, so U does
not teach the model to stop early). `GENERAL_PROMPTS` is a built-in set of short general questions.

    retention = own_answers(model, tokenizer)                      # before training
    valuer = at.AlphaToken(model, cfg, fisher=fisher, validation=val, retention=retention)
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .batch import IGNORE_INDEX

GENERAL_PROMPTS = (
    "What is the tallest animal?", "Name a vegetable that is green.", "How many minutes are in an hour?",
    "What do plants need to grow?", "Give an antonym for fast.", "What is the smallest prime number?",
    "What does a compass show?", "Who painted the Mona Lisa?", "What is 12 plus 15?",
    "Name a bird that cannot fly.", "What shape has three sides?", "What is ice made of?",
    "How many months are in a year?", "What is the hottest planet in the solar system?", "What do cows drink?",
    "Name a musical instrument with strings.", "What is the opposite of up?", "What organ pumps blood?",
    "How many sides does a hexagon have?", "What color are bananas when they are ripe?",
    "What is the main ingredient of bread?", "Which season comes after winter?", "What is 9 minus 4?",
    "Name a tool used to cut paper.", "What does a doctor do?", "What is the largest planet?",
    "Give a word that rhymes with cat.", "What do you call a baby dog?", "How many wheels does a bicycle have?",
    "What is the first letter of the alphabet?", "What language has the most native speakers?",
    "What is rain made of?",
)


def chat_prompt(tokenizer) -> Callable[[str], str]:
    """The text before an answer: the tokenizer's chat template with a user turn and the generation prompt, or
    the bare prompt and a newline when it has no template."""
    if getattr(tokenizer, "chat_template", None):
        return lambda prompt: tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                            add_generation_prompt=True, tokenize=False)
    return lambda prompt: prompt + "\n"


@torch.no_grad()
def greedy_answers(model, tokenizer, prefixes: Sequence[str], max_new_tokens: int, batch_size: int = 16):
    """[(prefix ids, answer ids)] per text of `prefixes`: the model's greedy continuation (left-padded batches on
    the model's device), cut after its end-of-sequence token when it has one. The model's train/eval mode is
    restored."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(prefixes), batch_size):
            encoded = [tokenizer(text, add_special_tokens=False)["input_ids"]
                       for text in prefixes[start:start + batch_size]]
            width = max(len(e) for e in encoded)
            input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
            attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
            generated = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                       do_sample=False, pad_token_id=pad, eos_token_id=eos)
            for e, answer in zip(encoded, generated[:, width:].tolist()):
                out.append((e, answer[:answer.index(eos) + 1] if eos in answer else answer))
    finally:
        model.train(was_training)
    return out


def own_answers(model, tokenizer, prompts: Sequence[str] = GENERAL_PROMPTS, max_new_tokens: int = 8,
                prefix: Optional[Callable[[str], str]] = None, batch_size: int = 16) -> dict:
    """A right-padded batch {input_ids, attention_mask, labels} of `prefix(prompt)` followed by the model's own
    greedy answer (at most `max_new_tokens` tokens, labelled; the prefix is -100). An answer that ends within the
    budget keeps its end-of-sequence token as a label; one cut short has none.

    prefix: prompt -> the text before the answer (default: `chat_prompt(tokenizer)`).
    """
    if not prompts:
        raise ValueError("own_answers needs at least one prompt")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prefix = prefix or chat_prompt(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [(e + answer, [IGNORE_INDEX] * len(e) + answer)
            for e, answer in greedy_answers(model, tokenizer, [prefix(p) for p in prompts], max_new_tokens,
                                            batch_size)]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (ids, labs) in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[b, :len(labs)] = torch.tensor(labs)
        attention[b, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


__all__ = ["GENERAL_PROMPTS", "chat_prompt", "greedy_answers", "own_answers"]
