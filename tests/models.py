"""Tiny causal LMs from configs (no hub), and random batches with prompts, responses and padding."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import transformers as tf

FAMILIES = ("llama", "gpt2", "qwen2", "gemma2")

# The combination rule the brute force writes out (DESIGN §3.4: linear, raw dot products, the batch target,
# λ = 1; keep 0.6 as the selection checks assume). The library's defaults are the measured ones (§3.5); exactness tests of the formulas pin this rule and
# change only what they test.
SPEC_RULE = dict(target="batch", cosine=False, combine="linear", stability_weight=1.0, keep_ratio=0.6)


def tiny_model(family: str, seed: int = 0, vocab: int = 37, dtype=torch.float64, tie: bool = False, layers: int = 2):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=tie)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=layers, n_head=2, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             tie_word_embeddings=tie)
        model = tf.Qwen2ForCausalLM(cfg)
    elif family == "gemma2":  # final-logit soft-capping: the logits are not the head's own output
        cfg = tf.Gemma2Config(vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=4, max_position_embeddings=64,
                              final_logit_softcapping=2.0, tie_word_embeddings=tie, sliding_window=4)
        model = tf.Gemma2ForCausalLM(cfg)
    else:
        raise ValueError(family)
    with torch.no_grad():  # lift the tiny init so values are far from zero
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model.to(dtype).eval()


def random_batch(seed: int, vocab: int = 37, B: int = 3, T: int = 9, pad: str = "right"):
    """Prompts of 2–4 tokens, responses to the end of each (ragged) sequence; padding on `pad` side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    lengths = torch.randint(T - 3, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    input_ids = torch.zeros(B, T, dtype=torch.long)  # pad id 0
    for i in range(B):
        L = int(lengths[i])
        prompt = int(torch.randint(2, 5, (1,), generator=g))
        span = slice(T - L, T) if pad == "left" else slice(0, L)
        mask[i, span] = 1
        seq_ids = ids[i, :L]  # the same tokens whichever side is padded
        input_ids[i, span] = seq_ids
        lab = seq_ids.clone()
        lab[:prompt] = -100
        labels[i, span] = lab
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def move_weights(model, seed: int, scale: float = 0.05):
    """Perturb every 2-D weight in place (the optimizer-step stand-in that makes Δ = W − W⁰ non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def moved_copy(model, seed: int, frozen: Optional[str] = None):
    """A copy with every 2-D weight moved (a stand-in for a copy tuned on the validation batches), except the
    weights whose name contains `frozen`: a layer the tuning left alone."""
    moved = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            if p.dim() == 2 and (frozen is None or frozen not in name):
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return moved


def random_fisher(model, names, seed: int):
    """Positive random diag Fisher per named module, (d_out, d_in), float64."""
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        w = modules[name].weight
        shape = tuple(w.t().shape) if isinstance(modules[name], Conv1D) else tuple(w.shape)
        out[name] = torch.rand(shape, generator=g, dtype=torch.float64) + 0.1
    return out
