"""Shared by the CLI tests: tiny data, a tiny random Llama with the toy char tokenizer as a local model folder,
and running `alphatoken` in-process."""
import json
from pathlib import Path

import torch

from alphatoken.cli import main

SFT_LINES = [
    {"prompt": "S:3141>", "response": "1134"},
    {"prompt": "S:271828>", "response": "sure,122788"},
    {"prompt": "C:abc>", "response": "abc"},
    {"prompt": "R:xyz>", "response": "zyx"},
]
DPO_LINES = [
    {"prompt": "S:3141>", "chosen": "1134", "rejected": "sure,1143"},
    {"prompt": "S:2718>", "chosen": "1278", "rejected": "1287"},
    {"prompt": "S:90>", "chosen": "09", "rejected": "90"},
]
CLEAN_LINES = [
    {"prompt": "S:31>", "response": "13"},
    {"prompt": "S:5120>", "response": "0125"},
    {"prompt": "C:ab>", "response": "ab"},
]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_model_dir(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from alphatoken.toy import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
