"""Fine-tuning loop of the toy world: plain SFT ("full") or any object with `value_and_loss(batch)`."""
from __future__ import annotations

import random
import time
from typing import Optional, Sequence, Union

import torch

from ..progress import progress as bar, progress_enabled
from .data import collate
from .tasks import Example

MODEL_KEYS = ("input_ids", "attention_mask", "labels")


def batches(examples: Sequence[Example], tokenizer, batch_size: int, seed: int, steps: int,
            return_noise: bool = True):
    """`steps` training batches: epochs over `examples` in a seeded shuffled order (reshuffled every epoch)."""
    if not examples:
        raise ValueError("no training examples")
    rng = random.Random(seed)
    order: list = []
    for _ in range(steps):
        if len(order) < batch_size:
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        yield collate([examples[i] for i in idx], tokenizer, return_noise=return_noise)


def finetune(model, tokenizer, train_examples: Sequence[Example], method: Union[str, object] = "full",
             steps: int = 150, batch_size: int = 16, lr: float = 1e-3, seed: int = 0, progress: bool = False,
             grad_clip: Optional[float] = 1.0, log_every: int = 50, optimizer: str = "adamw") -> dict:
    """Fine-tune `model` in place with AdamW (or `optimizer="sgd"`, or `"sgdm"`: SGD with momentum 0.9);
    constant `lr`, no weight decay; `grad_clip` (global norm; None: off).

    method: "full" (mean cross-entropy over every response token) or an object with `value_and_loss(batch)`
        returning the masked loss and, after the call, `last_values` (TokenValues) whose `mask` says which
        tokens were kept — an `alphatoken.AlphaToken` or an `alphatoken.scorers` scorer. The method object is
        not closed here.
    Batches come from `batches(...)` with this `seed`; torch is seeded with `seed` too.

    Returns {"steps", "tokens_trained" (kept response tokens, summed over steps, incl. <eos>), "response_tokens"
    (all response tokens seen), "keep_ratio", "noise_tokens", "noise_kept" (noise tokens that were kept),
    "noise_dropped_share" (share of noise tokens dropped), "clean_dropped_share", "wall_time" (s, training loop
    only), "losses" (per step)}.
    """
    if not (method == "full" or hasattr(method, "value_and_loss")):
        raise ValueError(f"method must be 'full' or an object with value_and_loss(batch), got {method!r}")
    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr)
    elif optimizer == "sgdm":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    else:
        raise ValueError(f"optimizer must be 'adamw', 'sgd' or 'sgdm', got {optimizer!r}")
    stats = {"steps": steps, "tokens_trained": 0, "response_tokens": 0, "noise_tokens": 0, "noise_kept": 0,
             "clean_kept": 0, "losses": []}
    start = time.perf_counter()
    label = "full" if method == "full" else type(method).__name__
    stream = batches(train_examples, tokenizer, batch_size, seed, steps)
    for step, batch in enumerate(bar(stream, f"fine-tune ({label})", total=steps, enabled=None if progress else False)):
        noise = batch.pop("noise")
        response = batch["labels"] != -100
        if method == "full":
            loss = model(**batch).loss
            kept = response
        else:
            loss = method.value_and_loss(batch)
            values = getattr(method, "last_values", None)
            kept = values.mask.to(response.device) & response if values is not None else response
        loss.backward()
        if grad_clip is not None:
            stats.setdefault("grad_norms", []).append(float(torch.nn.utils.clip_grad_norm_(params, grad_clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats["losses"].append(float(loss.detach()))
        stats["tokens_trained"] += int(kept.sum())
        stats["response_tokens"] += int(response.sum())
        stats["noise_tokens"] += int((noise & response).sum())
        stats["noise_kept"] += int((noise & kept).sum())
        stats["clean_kept"] += int((~noise & kept).sum())
        if progress and not progress_enabled() and (step + 1) % log_every == 0:  # no bar: a log line instead
            recent = stats["losses"][-log_every:]
            print(f"  step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f}", flush=True)
    stats["wall_time"] = time.perf_counter() - start
    clean = stats["response_tokens"] - stats["noise_tokens"]
    stats["keep_ratio"] = stats["tokens_trained"] / max(1, stats["response_tokens"])
    stats["noise_dropped_share"] = 1 - stats["noise_kept"] / max(1, stats["noise_tokens"])
    stats["clean_dropped_share"] = 1 - stats["clean_kept"] / max(1, clean)
    return stats
