"""What more than one command needs: printing, the device, AlphaTokenConfig from flags, sequence length, the
reference Fisher, and the valuer built from them."""
from __future__ import annotations

import contextlib
import os
import re
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


class RunError(Exception):
    """A failure that is not bad input (a full disk, a file that cannot be written): one line, exit status 1."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def config_overrides(args) -> dict:
    """The AlphaTokenConfig fields given as flags (see `config_flags.add_config_flags`)."""
    from .config_flags import config_from_args

    return config_from_args(args)


def valuation_config(values: dict, where: str = "AlphaToken setting"):
    """An AlphaTokenConfig from a dict (keep_ratio defaulting to 0.6; values typed as the fields are, so YAML
    strings and saved settings work), with bad keys or values reported as one line (exit 2). A tracked_layers
    regex is compiled here, before any work."""
    import re

    from ..config import AlphaTokenConfig
    from .config_flags import coerce_all

    values = coerce_all({"keep_ratio": DEFAULT_KEEP_RATIO, **values}, where)
    tracked = values.get("tracked_layers")
    if isinstance(tracked, str) and tracked != "all":
        try:
            re.compile(tracked)
        except re.error as err:
            raise UserError(f"tracked_layers {tracked!r}: not 'all', a block count or a valid regex ({err})") from None
    try:
        return AlphaTokenConfig(**values)
    except (ValueError, TypeError) as err:
        raise UserError(f"bad AlphaToken setting: {err}") from None


def check_tracked_layers(model, cfg) -> None:
    """UserError, before any work on the model, unless the valuer can track what `cfg` asks for: a
    tracked_layers regex must match at least one layer besides the head (else only the head would be valued)."""
    from ..batch import unwrap_model
    from ..layers import discover_layers

    try:
        layers = discover_layers(unwrap_model(model), cfg.tracked_layers, cfg.track_embeddings)
    except ValueError as err:
        raise UserError(f"tracked_layers {cfg.tracked_layers!r}: {err}") from None
    if isinstance(cfg.tracked_layers, str) and cfg.tracked_layers != "all":
        if not any(not layer.is_head and layer.kind != "embedding" for layer in layers):
            names = [n for n, m in unwrap_model(model).named_modules() if n and not list(m.children())][:3]
            raise UserError(
                f"tracked_layers {cfg.tracked_layers!r} matches no layer besides the head, so only the head would "
                f"be valued; give a regex that matches module names (such as {', '.join(names)}), a block "
                "count (--tracked-layers 2) or all")


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
                    pad_id: int, device, show: Optional[bool], cfg=None):
    """The reference Fisher (`fisher`: diag, kfac or none) from the first `n_batches` batches of responses, over
    the layers `cfg` tracks (tracked_layers, track_embeddings)."""
    import alphatoken as at

    from ..data import chunks, collate

    if fisher == "none":
        return None
    if fisher not in ("diag", "kfac"):
        raise UserError(f"--fisher must be diag, kfac or none; got {fisher!r}")
    if n_batches < 1:
        raise UserError(f"--fisher-batches must be >= 1, got {n_batches}")
    groups = chunks(response_rows(examples, kind), batch_size)[:n_batches]
    batches = [collate(g, pad_id, device=device) for g in groups]
    layers = {} if cfg is None else {"tracked_layers": cfg.tracked_layers, "track_embeddings": cfg.track_embeddings}
    return at.estimate_fisher(model, batches, kind=fisher, progress=show, **layers)


def save_fisher(fisher, path: Path) -> None:
    """Write the Fisher beside `path` and rename it into place; a failure (a full disk) names the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fisher.save(str(tmp))
        os.replace(tmp, path)
    except OSError as err:
        raise RunError(f"{path}: cannot write the Fisher ({err.strerror or err}); free space or pass another "
                       "--out") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def load_fisher(path: Path, device, kind: Optional[str] = None):
    """The Fisher saved at `path`, its digest checked; UserError naming the file if it is damaged or not the
    `kind` expected."""
    import alphatoken as at

    try:
        fisher = at.Fisher.load(str(path), device=device)
    except (ValueError, OSError, KeyError) as err:
        raise UserError(f"{path}: cannot use this Fisher file ({err}); delete it to estimate the Fisher "
                        "again") from None
    except Exception as err:  # safetensors' own errors for a damaged header
        raise UserError(f"{path}: damaged Fisher file ({type(err).__name__}: {err}); delete it to estimate the "
                        "Fisher again") from None
    if kind is not None and fisher.kind != kind:
        raise UserError(f"{path}: a {fisher.kind} Fisher, but fisher is {kind}; delete it or set fisher: "
                        f"{fisher.kind}")
    return fisher


def sha256_of(path) -> str:
    """Content hash of a file, or of a folder (every file under it, by relative path and content)."""
    import hashlib

    root = Path(path)
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        if root.is_dir():
            rel = p.relative_to(root).as_posix()
            if rel.startswith(".") or "/." in rel:  # our own temporaries, caches
                continue
            h.update(rel.encode() + b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def model_folder(spec: str) -> Optional[Path]:
    """The folder `--model` names ('builtin': the shipped toy model's), or None if there is none."""
    if spec in (None, "", "builtin"):
        from ..toy import BUILTIN_DIR

        return Path(os.environ.get("ALPHATOKEN_TOY_MODEL_DIR") or BUILTIN_DIR)
    p = Path(spec)
    if not p.exists() and spec.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        from ..pretrained import cache_dir

        cached = cache_dir(spec)
        return cached if cached.is_dir() else None
    return p if p.is_dir() else None


def is_within(path, folder) -> bool:
    """True if `path` is `folder` or lies under it (symlinks resolved)."""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


_TEMP_NAME = re.compile(r"^\..+?\.(\d+)\.[^.]*\.?(tmp|old|del)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(folder, names=None) -> list[str]:
    """Remove what killed runs left in `folder`: temporary files and folders named `.NAME.PID.*.tmp` / `.old` /
    `.del` whose process is gone, for NAME in `names` (each a name or a prefix ending in "*"; None: any).
    Returns the names removed."""
    import shutil

    removed = []
    root = Path(folder)
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        m = _TEMP_NAME.match(p.name)
        if not m or _alive(int(m.group(1))):
            continue
        if names is not None and not any(
                p.name.startswith(f".{n[:-1]}") if n.endswith("*") else p.name.startswith(f".{n}.") for n in names):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p.name)
    return removed


def new_valuer(model, cfg, fisher, **kwargs):
    """`alphatoken.AlphaToken(model, cfg, fisher=fisher, **kwargs)`, without the warning about fisher=None (the
    user chose --fisher none) nor the one about the tuned copy's learning rate when no optimizer is given (`score`
    has no run; its --tune-lr help says what None means)."""
    import warnings

    import alphatoken as at

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fisher=None.*")
        warnings.filterwarnings("ignore", message=".*tuned target's copy is tuned at.*")
        return at.AlphaToken(model, cfg, fisher=fisher, **kwargs)


def reference_logprobs(model, batch: dict):
    """Per-token log-probabilities of `batch`'s labels under `model`, without gradients (DPO's reference):
    `alphatoken.tokens.reference_logprobs`, imported when first used."""
    from ..tokens import reference_logprobs as logprobs

    return logprobs(model, batch)
