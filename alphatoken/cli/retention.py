"""--retention builtin|FILE: the retention batch of the validation target (DESIGN §3.8) for `score` and `train`.

* builtin: the model's own greedy answers to `alphatoken.retention.GENERAL_PROMPTS` (their first
  --retention-tokens tokens), generated before any training step;
* FILE with prompt/response records: those responses, as given (what the model must keep saying);
* FILE with prompt-only records: the model's own greedy answers to those prompts, as for builtin.
"""
from __future__ import annotations

from typing import Optional

from ..errors import UserError

BUILTIN = "builtin"
DEFAULT_TOKENS = 8


def retention_tokens(value: Optional[int]) -> int:
    """--retention-tokens, or its default."""
    return DEFAULT_TOKENS if value is None else value


def check_retention(spec: Optional[str], tokens: int, target: str,
                    names: tuple[str, str] = ("--retention", "--retention-tokens")) -> None:
    """UserError unless the retention settings can be used, before any work: 'builtin' or a readable file of
    prompts or prompt/response records, tokens >= 1, target validation. `names`: how the two settings are called
    in the messages (flags, or the YAML keys)."""
    where, tokens_name = names
    if spec is None:
        return
    if not isinstance(spec, str):
        raise UserError(f"{where} must be 'builtin' or a JSONL file path, got {spec!r}")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise UserError(f"{tokens_name} must be an integer >= 1, got {tokens!r}")
    if target != "validation":
        raise UserError(f"{where} adds to the validation target's direction, but target is {target!r}; pass "
                        "--validation FILE (a clean prompt/response JSONL of the target task) too")
    if spec != BUILTIN:
        _read_retention_file(spec, where)


def _read_retention_file(path: str, where: str = "--retention"):
    """(prompts, None) for a file of prompt-only records, (None, records) for prompt/response records; UserError
    for anything else (a missing file, preference pairs, an empty prompt)."""
    from ..data import detect_kind, read_jsonl

    records = read_jsonl(path)
    if all(set(r.data) == {"prompt"} for r in records):
        bad = [r.where for r in records if not isinstance(r.data["prompt"], str) or not r.data["prompt"]]
        if bad:
            raise UserError(f"{bad[0]}: the prompt must be a non-empty string")
        return [r.data["prompt"] for r in records], None
    if detect_kind(records) != "sft":
        raise UserError(f"{where} {path}: needs prompts, or prompt/response records, not preference pairs")
    return None, records


def retention_batch(spec: str, model, tokenizer, pad_id: int, *, max_length: Optional[int], tokens: int, device,
                    add_eos: bool = True) -> dict:
    """The retention batch for `spec` (see the module docstring), on `device`. Generated answers come from the
    model as it is now: call this before any training step (and before a --resume restores a checkpoint)."""
    from ..data import collate, tokenize_records
    from ..retention import GENERAL_PROMPTS, own_answers

    prompts, records = (list(GENERAL_PROMPTS), None) if spec == BUILTIN else _read_retention_file(spec)
    if records is not None:
        examples = tokenize_records(records, tokenizer, "sft", max_length=max_length, add_eos=add_eos)
        return collate(examples, pad_id, device=device)
    batch = own_answers(model, tokenizer, prompts, max_new_tokens=tokens)
    return {k: v.to(device) for k, v in batch.items()}
