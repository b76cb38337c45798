"""A character-level tokenizer for the toy world, built with `tokenizers` and wrapped as a HF fast tokenizer.

Every character of `CHARS` is one token; `<pad>`, `<bos>`, `<eos>`, `<unk>` are the special tokens; any other
character becomes `<unk>`, with a warning naming it (once per character and tokenizer). The result is a
`transformers.PreTrainedTokenizerFast` (its subclass `ToyTokenizer`), so `save_pretrained(dir)` /
`AutoTokenizer.from_pretrained(dir)` round-trip it (`ToyTokenizer.from_pretrained(dir)` keeps the warning).
`encode` adds no special tokens: the toy `collate` places `<bos>` and `<eos>` itself.
"""
from __future__ import annotations

import functools
import string
import warnings

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# digits, lowercase letters (copy/reverse content, filler), task codes, separators and the noise markers
CHARS = string.digits + string.ascii_lowercase + "ACRS" + ":>+=,#|"


def unknown_characters(text: str) -> list[str]:
    """The characters of `text` outside the toy vocabulary (special-token strings aside), in order of appearance."""
    known = set(CHARS)
    for tok in SPECIAL_TOKENS:
        text = text.replace(tok, "")
    return list(dict.fromkeys(ch for ch in text if ch not in known))


def _texts(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _texts(v)]
    return []


@functools.lru_cache(maxsize=1)
def _tokenizer_class():
    from transformers import PreTrainedTokenizerFast

    class ToyTokenizer(PreTrainedTokenizerFast):
        """The toy char tokenizer: warns once per character it maps to <unk>, naming the characters."""

        def _encode_plus(self, text, text_pair=None, *args, **kwargs):
            reported = self.__dict__.setdefault("_reported_unknown", set())
            new = [ch for t in _texts(text) + _texts(text_pair) for ch in unknown_characters(t)
                   if ch not in reported]
            new = list(dict.fromkeys(new))
            if new:
                reported.update(new)
                warnings.warn(
                    f"the toy tokenizer has no token for {', '.join(repr(c) for c in new)}: mapped to <unk> (its "
                    f"vocabulary is digits, a-z, ACRS and {':>+=,#|'!r}; further occurrences are not reported)",
                    UserWarning, stacklevel=4)
            return super()._encode_plus(text, text_pair, *args, **kwargs)

    ToyTokenizer.__module__, ToyTokenizer.__qualname__ = __name__, "ToyTokenizer"  # picklable by name
    return ToyTokenizer


def __getattr__(name):  # ToyTokenizer without importing transformers at module import
    if name == "ToyTokenizer":
        return _tokenizer_class()
    raise AttributeError(name)


def build_tokenizer():
    """The toy char-level tokenizer (pad id 0, bos 1, eos 2, unk 3), right padding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return _tokenizer_class()(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="right",
        model_max_length=64,
    )
