"""Shared helpers of the integration / DPO / offline / DDP tests: a tiny Llama from a config and a char tokenizer."""
from __future__ import annotations

import string

import torch

CHARS = string.ascii_lowercase + string.digits + " :>"
PAD, BOS, EOS = 0, 1, 2


def tiny_llama(seed: int = 0, vocab_size: int = 48, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float()


def tokenizer():
    """A char-level PreTrainedTokenizerFast built locally (pad 0, bos 1, eos 2, unk 3)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="right", model_max_length=64)


def sft_examples(n: int = 16, seed: int = 0):
    """Tokenized SFT examples: input_ids and labels (-100 on the prompt), varying lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = int(torch.randint(2, 6, (1,), generator=g))
        r = int(torch.randint(3, 8, (1,), generator=g))
        ids = [BOS] + torch.randint(4, 40, (p + r,), generator=g).tolist() + [EOS]
        labels = [-100] * (p + 1) + ids[p + 1:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def pad_batch(examples, pad_id: int = PAD) -> dict:
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    att = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e["input_ids"])
        ids[i, :L] = torch.tensor(e["input_ids"])
        labels[i, :L] = torch.tensor(e["labels"])
        att[i, :L] = 1
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def collate(features):
    return pad_batch([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
