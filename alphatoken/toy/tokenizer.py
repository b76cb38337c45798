"""A character-level tokenizer for the toy world, built with `tokenizers` and wrapped as a HF fast tokenizer.

Every character of `CHARS` is one token; `<pad>`, `<bos>`, `<eos>`, `<unk>` are the special tokens. The result
is a `transformers.PreTrainedTokenizerFast`, so `save_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)`
round-trip it. `encode` adds no special tokens: the toy `collate` places `<bos>` and `<eos>` itself.
"""
from __future__ import annotations

import string

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# digits, lowercase letters (copy/reverse content, filler), task codes, separators and the noise markers
CHARS = string.digits + string.ascii_lowercase + "ACRS" + ":>+=,#|"


def build_tokenizer():
    """The toy char-level tokenizer (pad id 0, bos 1, eos 2, unk 3), right padding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=64,
    )
