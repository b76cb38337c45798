"""What more than one command needs: printing, the device, AlphaTokenConfig from flags, sequence length, the
reference Fisher, and the valuer built from them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..errors import UserError

# keep_ratio when neither the flags nor the YAML set one (score and train)
DEFAULT_KEEP_RATIO = 0.6


def say(*args) -> None:
    print(*args, flush=True)


def progress_setting(quiet: bool) -> Optional[bool]:
    """The `enabled` argument for progress bars: off with --quiet, else None (bars only on a terminal)."""
    return False if quiet else None


def check_output_file(path, flag: str) -> Path:
    """UserError, naming `flag`, unless output file `path` could be written (creates nothing)."""
    from ..data import ensure_output_file

    try:
        return ensure_output_file(path)
    except UserError as err:
        reason = str(err).split(": ", 1)[-1].replace("pass a writable --out", f"pass a writable {flag} path")
        raise UserError(f"{flag} {path}: {reason}") from None


def resolve_device(name: Optional[str]):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here; use --device cpu")
    return device


def config_overrides(args) -> dict:
    """The valuation flags that were given (see `parser.add_valuation_flags`), as AlphaTokenConfig fields."""
    out = {}
    for flag, key in (("keep_ratio", "keep_ratio"), ("selection", "selection"),
                      ("stability_weight", "stability_weight"), ("causal_weight", "causal_weight"),
                      ("paths", "paths"), ("tracked_layers", "tracked_layers"), ("normalize", "normalize")):
        value = getattr(args, flag, None)
        if value is not None:
            if key == "tracked_layers" and isinstance(value, str) and value.isdigit():
                value = int(value)
            out[key] = value
    return out


def valuation_config(values: dict):
    """An AlphaTokenConfig from a dict (keep_ratio defaulting to 0.6), with bad keys or values reported as one
    line."""
    from ..config import AlphaTokenConfig
    import dataclasses

    values = {"keep_ratio": DEFAULT_KEEP_RATIO, **values}
    known = {f.name for f in dataclasses.fields(AlphaTokenConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown AlphaToken setting(s) {unknown}; valid: {sorted(known)}")
    try:
        return AlphaTokenConfig(**values)
    except (ValueError, TypeError) as err:
        raise UserError(f"bad AlphaToken setting: {err}") from None


def max_length_for(model, tokenizer, requested: Optional[int]) -> Optional[int]:
    """The longest sequence the model, the tokenizer and --max-length all allow (None: no limit known)."""
    limits = []
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        limits.append(n)
    t = getattr(tokenizer, "model_max_length", None)
    if isinstance(t, int) and 0 < t < 1_000_000:
        limits.append(t)
    if requested is not None:
        if requested < 2:
            raise UserError(f"--max-length must be >= 2, got {requested}")
        limits.append(requested)
    return min(limits) if limits else None


def response_rows(examples: list[dict], kind: str) -> list[dict]:
    """One row per response: SFT examples as they are, preference pairs split into chosen then rejected."""
    from ..data import split_pairs

    return examples if kind == "sft" else split_pairs(examples)


def estimate_fisher(model, examples: list[dict], kind: str, *, fisher: str, batch_size: int, n_batches: int,
                    pad_id: int, device, show: Optional[bool]):
    """The reference Fisher (`fisher`: diag, kfac or none) from the first `n_batches` batches of responses."""
    import alphatoken as at

    from ..data import chunks, collate

    if fisher == "none":
        return None
    if fisher not in ("diag", "kfac"):
        raise UserError(f"--fisher must be diag, kfac or none; got {fisher!r}")
    groups = chunks(response_rows(examples, kind), batch_size)[: max(1, n_batches)]
    batches = [collate(g, pad_id, device=device) for g in groups]
    return at.estimate_fisher(model, batches, kind=fisher, progress=show)


def save_fisher(fisher, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fisher.save(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def new_valuer(model, cfg, fisher, **kwargs):
    """`alphatoken.AlphaToken(model, cfg, fisher=fisher, **kwargs)`, without the warning about fisher=None (the
    user chose --fisher none)."""
    import warnings

    import alphatoken as at

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fisher=None.*")
        return at.AlphaToken(model, cfg, fisher=fisher, **kwargs)


def reference_logprobs(model, batch: dict):
    """Per-token log-probabilities of `batch`'s labels under `model`, without gradients (DPO's reference)."""
    import torch

    from ..engine import model_inputs
    from ..losses import token_logprobs

    with torch.no_grad():
        logits = model(**model_inputs(model, batch)).logits
        return token_logprobs(logits, batch["labels"])
