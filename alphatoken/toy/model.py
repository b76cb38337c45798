"""The tiny Llama of the toy world: config, pre-training on the retention mixture, and the shipped built-in model."""
from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path
from typing import Optional

import torch

from ..batch import IGNORE_INDEX

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"


def tiny_config(vocab_size: int = 51, hidden_size: int = 96, num_layers: int = 3, num_heads: int = 4,
                intermediate_size: int = 256, max_position_embeddings: int = 64):
    """A tiny `LlamaConfig` (about 0.3 M parameters at the defaults); untied head, no dropout."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attention_dropout=0.0,
    )


def build_model(tokenizer=None, seed: int = 0, **config_kwargs):
    """A freshly initialized tiny `LlamaForCausalLM` (fp32, eager-free SDPA attention) sized to the tokenizer."""
    from transformers import LlamaForCausalLM

    if tokenizer is not None:
        config_kwargs.setdefault("vocab_size", len(tokenizer))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config_kwargs))
    return model


def pretrain(model, tokenizer, steps: int = 3000, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
             warmup: int = 100, log_every: int = 200, progress: bool = True, eval_every: int = 0,
             label_smoothing: float = 0.0) -> dict:
    """Pre-train on an endless stream of the clean retention mixture (response-only loss, AdamW, cosine LR).

    label_smoothing > 0 caps the model's confidence (the logit margins), so that fine-tuning on a new task
    starts from a moderate loss instead of a huge one.

    Returns {"losses": [...], "wall_time": s, "accuracy": {task: exact match}} (accuracy at the end).
    """
    from .data import collate
    from .evaluate import evaluate_tasks
    from .tasks import retention_eval_sets, retention_mixture

    eval_sets = retention_eval_sets(n=200)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    losses, start = [], time.perf_counter()
    chunk = 50_000
    pool, cursor = [], 0
    for step in range(steps):
        if cursor + batch_size > len(pool):
            pool, cursor = retention_mixture(chunk, seed=seed * 7919 + step), 0
        batch = collate(pool[cursor:cursor + batch_size], tokenizer)
        cursor += batch_size
        if label_smoothing > 0:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
        else:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if progress and (step + 1) % log_every == 0:
            msg = f"pretrain step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.4f}"
            if eval_every and (step + 1) % eval_every == 0:
                msg += f" acc {evaluate_tasks(model, tokenizer, eval_sets)}"
            print(msg, f"{time.perf_counter() - start:.0f}s", flush=True)
    acc = evaluate_tasks(model, tokenizer, eval_sets)
    return {"losses": losses, "wall_time": time.perf_counter() - start, "accuracy": acc}


def save_builtin(model, tokenizer, directory: Optional[os.PathLike] = None) -> Path:
    """Save model (safetensors) + config + tokenizer to `directory` (default: the package's builtin/)."""
    directory = Path(directory) if directory is not None else BUILTIN_DIR
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def load_builtin(directory: Optional[os.PathLike] = None, device: str = "cpu"):
    """The shipped pre-trained toy model and its tokenizer: `(LlamaForCausalLM, PreTrainedTokenizerFast)`.

    The model is in train mode (no dropout, so it only matters for hooks), fp32, on `device`. Each call loads a
    fresh copy, so fine-tuning one never touches another.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    if directory is None:  # ALPHATOKEN_TOY_MODEL_DIR: try another build of the toy model without replacing it
        directory = os.environ.get("ALPHATOKEN_TOY_MODEL_DIR") or BUILTIN_DIR
    directory = Path(directory)
    if not (directory / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no built-in toy model at {directory}; build it with `python -m alphatoken.toy.build`")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device)
    model.train()
    return model, tokenizer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
