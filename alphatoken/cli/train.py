"""`alphatoken train`: SFT or DPO with AlphaToken's masked loss, settings from defaults < --config YAML < flags,
checkpoints every --save-every steps and an exact --resume from the newest one."""
from __future__ import annotations

import json
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .retention import BUILTIN, check_retention, retention_batch
from .shared import (config_overrides, estimate_fisher, max_length_for, new_valuer, progress_setting,
                     reference_logprobs, resolve_device, save_fisher, say, valuation_config)

TRAIN_DEFAULTS: dict = {
    "model": "builtin",        # "builtin" or a local Hugging Face model directory
    "data": None,              # JSONL: prompt/response (SFT) or prompt/chosen/rejected (DPO)
    "out": "alphatoken_run",   # checkpoints/, fisher.safetensors, final/, metrics.json
    "mode": None,              # "sft" | "dpo"; default: from the data's fields
    "steps": 100,
    "batch_size": 8,           # examples (DPO: pairs) per step
    "lr": 1.0e-4,
    "weight_decay": 0.0,
    "grad_clip": 1.0,          # max gradient norm (> 0); null for none
    "max_length": None,        # tokens per sequence; default: the model's limit
    "seed": 0,
    "save_every": 50,          # checkpoint every N steps (and at the end)
    "keep_checkpoints": 2,     # newest N kept
    "log_every": 10,
    "fisher": "kfac",          # "diag" | "kfac" | "none": reference Fisher at θ₀ for stability
    "fisher_batches": 8,
    "beta": 0.1,               # DPO β
    "device": "auto",
    "validation": None,        # clean prompt/response JSONL: the validation target (sets target: validation)
    "validation_batch_size": None,  # rows per validation batch; default: the whole file as one batch
    "retention": None,         # with validation: "builtin" or a JSONL of prompts or prompt/response records (§3.8)
    "retention_tokens": 8,     # tokens of each generated retention answer
    "keep_eos": False,         # always keep the tokenizer's eos token (adds its id to always_keep_token_ids)
    "alphatoken": {},          # every AlphaTokenConfig field, e.g. {keep_ratio: 0.6, selection: batch}
}
# what may differ between a run and its --resume (everything else must match for the run to continue exactly);
# data, model, validation and retention may move: their content hashes are compared instead of their paths
RESUME_MAY_CHANGE = {"steps", "save_every", "keep_checkpoints", "log_every", "device", "out"}
CONTENT_CHECKED = ("data", "model", "validation", "retention")
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "rng.pt")


def _grad_clip(text: str):
    return None if text.strip().lower() in ("none", "null") else float(text)


# (key, type, help) of the train flags that mirror a YAML key
TRAIN_FLAGS = [
    ("model", str, "local Hugging Face model folder, 'builtin' or 'smollm2'"),
    ("data", str, "JSONL training data"),
    ("out", str, "run folder"),
    ("steps", int, "optimizer steps"),
    ("batch_size", int, "examples (DPO: pairs) per step"),
    ("lr", float, "AdamW learning rate (the valuation's η is --valuation-lr)"),
    ("weight_decay", float, "AdamW weight decay"),
    ("grad_clip", _grad_clip, "max gradient norm, > 0, or none"),
    ("max_length", int, "tokens per sequence; none: the model's limit"),
    ("seed", int, "seed of the data order, the Fisher and the run"),
    ("save_every", int, "checkpoint every N steps and at the end"),
    ("keep_checkpoints", int, "newest checkpoints kept"),
    ("log_every", int, "print the loss every N steps (without progress bars)"),
    ("fisher", str, "reference Fisher: diag, kfac or none"),
    ("fisher_batches", int, "batches used to estimate the Fisher"),
    ("beta", float, "DPO β"),
    ("device", str, "auto, cpu, cuda or cuda:N"),
]


def _load_yaml(path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such config file; pass a YAML file with keys such as model, data, steps")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise UserError(f"{path}: YAML nested too deeply to read; use flat keys such as model, data, steps") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the config must be a mapping of keys to values, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - set(TRAIN_DEFAULTS))
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(TRAIN_DEFAULTS)}")
    if not isinstance(data.get("alphatoken", {}) or {}, dict):
        raise UserError(f"{path}: 'alphatoken' must be a mapping of AlphaTokenConfig fields")
    return data


def _number(cfg: dict, key: str, *, low: float, strict: bool, where: str) -> None:
    value = cfg[key]
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = cfg[key] = float(value)
        except ValueError:
            pass
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or (
            value <= low if strict else value < low):
        raise UserError(f"{where}{key} must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")


def _train_settings(args, base: Optional[dict] = None) -> dict:
    """defaults (or a resumed run's settings) < the --config YAML < flags, checked, with the valuation config
    resolved to every AlphaTokenConfig field (so a flag equal to the default equals the saved setting)."""
    from .score import check_validation_target

    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TRAIN_DEFAULTS.items()}
    for k, v in (base or {}).items():
        cfg[k] = dict(v) if isinstance(v, dict) else v
    if args.config:
        for k, v in _load_yaml(args.config).items():
            cfg[k] = dict(v or {}) if k == "alphatoken" else v
    for key, _, _ in TRAIN_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    for key in ("validation", "validation_batch_size", "retention", "retention_tokens", "keep_eos"):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    if args.dpo:
        cfg["mode"] = "dpo"
    where = f"{args.config}: " if args.config else ""
    if not cfg["data"]:
        raise UserError("no training data: pass --data FILE.jsonl or set 'data:' in the --config YAML")
    for key in ("steps", "batch_size", "save_every", "log_every", "fisher_batches", "keep_checkpoints", "seed",
                "max_length", "validation_batch_size"):
        value, low = cfg[key], (0 if key == "seed" else 2 if key == "max_length" else 1)
        if value is None and key in ("max_length", "validation_batch_size"):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise UserError(f"{where}{key} must be an integer >= {low}, got {value!r}")
    _number(cfg, "lr", low=0, strict=True, where=where)
    _number(cfg, "weight_decay", low=0, strict=False, where=where)
    _number(cfg, "beta", low=0, strict=True, where=where)
    if cfg["grad_clip"] is not None:
        _number(cfg, "grad_clip", low=0, strict=True, where=where)
    if not isinstance(cfg["keep_eos"], bool):
        raise UserError(f"{where}keep_eos must be true or false, got {cfg['keep_eos']!r}")
    if cfg["mode"] not in (None, "sft", "dpo"):
        raise UserError(f"{where}mode must be sft or dpo, got {cfg['mode']!r}")
    if str(cfg["fisher"]) not in ("diag", "kfac", "none", "None"):
        raise UserError(f"{where}fisher must be diag, kfac or none, got {cfg['fisher']!r}")
    cfg["fisher"] = "none" if cfg["fisher"] in (None, "None") else cfg["fisher"]
    for key in ("model", "data", "out", "device"):
        if not isinstance(cfg[key], str):
            raise UserError(f"{where}{key} must be a string, got {cfg[key]!r}")
    if cfg["validation"] is not None and not isinstance(cfg["validation"], str):
        raise UserError(f"{where}validation must be a file path, got {cfg['validation']!r}")
    overrides = {**(cfg["alphatoken"] or {}), **config_overrides(args)}
    overrides = check_validation_target(overrides, cfg["validation"], where=f"{where}validation",
                                        retention=cfg["retention"])
    cfg["alphatoken"] = valuation_config(overrides, where=f"{where}alphatoken").to_dict()
    check_retention(cfg["retention"], cfg["retention_tokens"], cfg["alphatoken"]["target"],
                    names=(f"{where}retention", f"{where}retention_tokens"))
    return cfg


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints under OUT/checkpoints, oldest first."""
    root = out / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = re.fullmatch(r"step-(\d+)", p.name)
            if m and all((p / f).is_file() for f in ("state.json",) + CHECKPOINT_FILES):
                found.append((int(m.group(1)), p))
    return sorted(found)


def _clean_run_folder(out: Path) -> None:
    """Remove what killed runs left: their temporary files and folders, and checkpoint folders that a killed
    prune left half-deleted (a complete checkpoint is only ever renamed into place whole)."""
    import shutil

    from .shared import clean_stale

    clean_stale(out, names=["final", "metrics.json", "fisher.safetensors", "checkpoints"])
    root = out / "checkpoints"
    clean_stale(root, names=["step-*"])
    complete = {p for _, p in _checkpoints(out)}
    if root.is_dir():
        for p in root.iterdir():
            if re.fullmatch(r"step-(\d+)", p.name) and p.is_dir() and p not in complete:
                shutil.rmtree(p, ignore_errors=True)


def _state_digest(state: dict) -> str:
    import hashlib

    body = {k: v for k, v in state.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_checkpoint_state(ckpt: Path) -> dict:
    """state.json of a checkpoint, with its digest and its files' digests checked (UserError naming the damaged
    file)."""
    from .shared import sha256_of

    path = ckpt / "state.json"
    hint = (f"delete {ckpt} to resume from the checkpoint before it (or start a new --out)")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: damaged checkpoint file ({err}); {hint}") from None
    if not isinstance(state, dict) or "settings" not in state or "step" not in state:
        raise UserError(f"{path}: damaged checkpoint file (not a checkpoint state); {hint}")
    if "digest" in state and state["digest"] != _state_digest(state):
        raise UserError(f"{path}: damaged checkpoint file (its digest does not match its content); {hint}")
    for name, digest in (state.get("files") or {}).items():
        if sha256_of(ckpt / name) != digest:
            raise UserError(f"{ckpt / name}: damaged checkpoint file (its sha256 differs from the one saved "
                            f"with it); {hint}")
    return state


def _rng_state() -> dict:
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(out: Path, step: int, model, optimizer, settings: dict, history: list, keep: int,
                     inputs: dict) -> Path:
    """Write checkpoint `step` whole (a temporary folder renamed into place), with the sha256 of every file and of
    its state; then prune to the newest `keep` (each pruned folder renamed aside first, so a kill mid-delete
    leaves no half checkpoint under a checkpoint's name). A write failure names the folder and the cause."""
    import shutil

    import torch
    from safetensors.torch import save_model

    from ..data import atomic_dir, temp_dir_beside
    from .shared import RunError, sha256_of

    final = out / "checkpoints" / f"step-{step:06d}"
    try:
        with atomic_dir(final) as tmp:
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            state = {"step": step, "settings": settings, "inputs": inputs, "history": history,
                     "files": {name: sha256_of(tmp / name) for name in CHECKPOINT_FILES}}
            state["digest"] = _state_digest(state)
            (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    except OSError as err:
        previous = _checkpoints(out)
        kept = f"the newest complete checkpoint is {previous[-1][1]}" if previous else "no checkpoint was written"
        raise RunError(f"{final}: cannot write the checkpoint at step {step} ({err.strerror or err}); {kept}; "
                       "free space and run again with --resume") from None
    for old_step, path in _checkpoints(out)[:-keep]:
        try:
            aside = temp_dir_beside(path, suffix=".del")
            os.replace(path, aside / "x")
        except OSError:
            continue
        shutil.rmtree(aside, ignore_errors=True)
    return final


def _batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The examples of `step`: epochs over the data in a seeded order, reshuffled every epoch (a pure function of
    the step, so a resumed run sees exactly the batches the uninterrupted run would have)."""
    import torch

    per_epoch = math.ceil(n / batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return perm[k * batch_size: (k + 1) * batch_size]


def _check_train_paths(s: dict, out: Path) -> None:
    """UserError unless the run's writes leave its inputs alone: the model, data, validation and retention files
    must not lie in OUT/final or OUT/checkpoints (replaced by this run), and OUT must not lie inside the model
    folder."""
    from .shared import is_within, model_folder

    model = model_folder(s["model"]) if s["model"] != "builtin" else None
    retention = s["retention"] if s["retention"] != BUILTIN else None
    for what, path in (("--model", model), ("--data", s["data"]), ("--validation", s["validation"]),
                       ("--retention", retention)):
        if path is None:
            continue
        for managed in (out / "final", out / "checkpoints", out / "metrics.json", out / "fisher.safetensors"):
            if is_within(path, managed):
                raise UserError(f"{what} {path} lies in {managed}, which this run writes over; copy it elsewhere "
                                "first or pass another --out")
    if model is not None and is_within(out, model):
        raise UserError(f"--out {out} lies inside the --model folder {model}; pass an --out outside it")


def _input_hashes(s: dict) -> dict:
    """sha256 of the data file, the model folder, the validation and retention files: a --resume must see the
    same."""
    from .shared import model_folder, sha256_of

    folder = model_folder(s["model"])
    hashes = {"data": sha256_of(s["data"]), "model": sha256_of(folder) if folder is not None else None}
    if s["validation"] is not None:
        hashes["validation"] = sha256_of(s["validation"])
    if s.get("retention") not in (None, BUILTIN):
        hashes["retention"] = sha256_of(s["retention"])
    return hashes


def _check_resume(s: dict, saved: dict, inputs: dict, ckpt: Path) -> None:
    """UserError naming the first setting or input that differs from the checkpoint's."""
    may = RESUME_MAY_CHANGE | (set(CONTENT_CHECKED) if saved.get("inputs") else set())
    for key, value in saved["settings"].items():
        if key in may:
            continue
        now = s.get(key)
        if key == "alphatoken":
            value = valuation_config(value or {}, where=f"{ckpt}").to_dict()
        if now != value:
            flag = "--" + key.replace("_", "-")
            raise UserError(
                f"--resume: {key} is {now!r} now but {value!r} in {ckpt}; resume with the same settings "
                f"(only {', '.join(sorted(RESUME_MAY_CHANGE - {'out'}))} may change; {flag})")
    for key, digest in (saved.get("inputs") or {}).items():
        if inputs.get(key) != digest:
            raise UserError(f"--resume: the {key} {s.get(key)} has changed since {ckpt} was written (sha256 "
                            f"{str(inputs.get(key))[:12]}… now, {str(digest)[:12]}… then); resume with the same "
                            "files or start a new --out")


def _write_final(out: Path, model, tokenizer, s: dict, history: list) -> tuple[int, int]:
    from ..data import atomic_dir, write_json
    from .shared import RunError

    try:
        with atomic_dir(out / "final") as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
        tokens = sum(h["kept"] for h in history)
        seen = sum(h["response_tokens"] for h in history)
        write_json(out / "metrics.json", {"settings": s, "steps": s["steps"], "tokens_trained": tokens,
                                          "response_tokens": seen, "history": history})
    except OSError as err:
        raise RunError(f"{out / 'final'}: cannot write the final model ({err.strerror or err}); the last "
                       "checkpoint is complete: free space and run again with --resume to write it") from None
    return tokens, seen


def _complete(out: Path, step: int) -> bool:
    metrics = out / "metrics.json"
    if not (out / "final" / "config.json").is_file() or not metrics.is_file():
        return False
    try:
        return json.loads(metrics.read_text(encoding="utf-8")).get("steps") == step
    except ValueError:
        return False


def cmd_train(args) -> int:
    import torch

    from ..data import ensure_output_dir, load_model, pad_id_of, tokenize_records
    from .score import validation_batches
    from .shared import check_tracked_layers

    # ---- everything checked before any work: no model load, no Fisher, no file written on bad input
    yaml_out = _load_yaml(args.config).get("out") if args.config else None
    out = Path(args.out or yaml_out or TRAIN_DEFAULTS["out"])
    start_step, history, saved, ckpt = _resume_point(args, out)
    s = _train_settings(args, base=saved["settings"] if saved else None)
    s["out"] = str(out)
    _check_train_paths(s, out)
    records, kind, mode = _train_records(s)
    ensure_output_dir(out)
    device = resolve_device(s["device"])
    inputs = _input_hashes(s)
    finishing = False
    if saved:
        _check_resume(s, saved, inputs, ckpt)
        if start_step >= s["steps"]:
            if _complete(out, start_step):
                raise UserError(f"--resume: the run is complete at step {start_step} (final model in "
                                f"{out / 'final'}); raise --steps to train further")
            finishing = True  # died after its last checkpoint, before final/: write final/ from it
            s["steps"] = start_step
    cfg = valuation_config(s["alphatoken"])
    show = progress_setting(args.quiet)
    out.mkdir(parents=True, exist_ok=True)
    _clean_run_folder(out)

    random.seed(s["seed"])
    torch.manual_seed(s["seed"])
    model, tokenizer = load_model(s["model"], device=device)
    model.train()
    check_tracked_layers(model, cfg)
    if s["keep_eos"]:
        cfg = _keeping_eos(cfg, tokenizer, s["model"])
    if finishing:
        from safetensors.torch import load_model as load_weights

        load_weights(model, str(ckpt / "model.safetensors"), strict=True, device=str(device))
        tokens, seen = _write_final(out, model, tokenizer, s, history)
        say(f"completed from {ckpt}: final model {out / 'final'} (step {start_step}, trained on {tokens} of {seen} "
            "response tokens)")
        return 0
    max_length = max_length_for(model, tokenizer, s["max_length"])
    examples = tokenize_records(records, tokenizer, kind, max_length=max_length)
    pad_id = pad_id_of(tokenizer)
    validation = None
    if s["validation"] is not None:
        validation = validation_batches(s["validation"], tokenizer, pad_id, max_length=max_length,
                                        batch_size=s["validation_batch_size"], device=device)
    retention = None
    if s["retention"] is not None:  # generated from θ₀, before a --resume restores its checkpoint
        retention = retention_batch(s["retention"], model, tokenizer, pad_id, max_length=max_length,
                                    tokens=s["retention_tokens"], device=device)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}  # θ₀
    ref_model = _frozen_copy(model) if mode == "dpo" else None

    fisher_path = out / "fisher.safetensors"
    fisher = _run_fisher(args, s, fisher_path, model, examples, mode, pad_id, device, show, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"])
    _restore_or_seed(start_step, ckpt, model, optimizer, device, s["seed"])

    say(f"training ({mode.upper()} with AlphaToken, keep {cfg.keep_ratio:.0%}) on {len(examples)} "
        f"{'examples' if mode == 'sft' else 'pairs'} from {s['data']}: steps {start_step}→{s['steps']}, "
        f"batch {s['batch_size']}, lr {s['lr']}, device {device}; output {out}")
    try:
        valuer = new_valuer(model, cfg, fisher, reference=reference, validation=validation, retention=retention,
                            optimizer=optimizer)
    except ValueError as err:
        where = f"{fisher_path}: " if fisher is not None and args.resume else ""
        raise UserError(f"{where}{err}") from None
    _train_loop(valuer, model, optimizer, params, examples, ref_model, s, mode, pad_id, device, out, history,
                inputs, start_step, show)
    tokens, seen = _write_final(out, model, tokenizer, s, history)
    say(f"done: {s['steps']} steps, trained on {tokens} of {seen} response tokens ({tokens / max(1, seen):.0%}); "
        f"final model {out / 'final'}, checkpoints {out / 'checkpoints'}")
    return 0


def _resume_point(args, out: Path):
    """(start step, history, saved state, checkpoint folder) of the run in `out`: from its last checkpoint with
    --resume; a fresh start otherwise, refused when `out` already holds checkpoints."""
    found = _checkpoints(out)
    if args.resume:
        if not found:
            raise UserError(f"--resume: no checkpoint under {out / 'checkpoints'}; start without --resume")
        start_step, ckpt = found[-1]
        saved = _read_checkpoint_state(ckpt)
        return start_step, saved["history"], saved, ckpt
    if found:
        raise UserError(f"{out}: already has checkpoints (last: step {found[-1][0]}); pass --resume to continue "
                        "or choose another --out")
    return 0, [], None, None


def _train_records(s: dict):
    """(records, kind, mode) of the training file, checked against the settings' mode (set in `s` when unset)."""
    from ..data import detect_kind, read_jsonl

    records = read_jsonl(s["data"])
    kind = detect_kind(records)
    mode = s["mode"] or kind
    if mode != kind:
        need = "prompt/chosen/rejected" if mode == "dpo" else "prompt/response"
        raise UserError(f"{s['data']}: mode {mode} needs {need} records, but the file has {kind} records")
    s["mode"] = mode
    if s["validation"] is not None:
        detect_kind(read_jsonl(s["validation"]))
    return records, kind, mode


def _run_fisher(args, s: dict, fisher_path: Path, model, examples, mode, pad_id, device, show, cfg):
    """The run's Fisher: None with fisher none; read back on --resume when saved; else estimated and saved."""
    from .shared import load_fisher

    if s["fisher"] == "none":
        return None
    if args.resume and fisher_path.is_file():
        return load_fisher(fisher_path, device, kind=s["fisher"])
    fisher = estimate_fisher(model, examples, mode, fisher=s["fisher"], batch_size=s["batch_size"],
                             n_batches=s["fisher_batches"], pad_id=pad_id, device=device, show=show, cfg=cfg)
    save_fisher(fisher, fisher_path)
    return fisher


def _restore_or_seed(start_step: int, ckpt, model, optimizer, device, seed: int) -> None:
    """Resuming: the model, optimizer and RNG state of the checkpoint; a fresh start: the seed."""
    import torch

    if not start_step:
        torch.manual_seed(seed)
        return
    from safetensors.torch import load_model as load_weights

    try:
        load_weights(model, str(ckpt / "model.safetensors"), strict=True, device=str(device))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
    except Exception as err:
        raise UserError(f"{ckpt}: damaged checkpoint ({type(err).__name__}: {err}); delete it to resume from "
                        "the checkpoint before it") from None
    say(f"resuming from {ckpt} (step {start_step})")


def _step_loss(valuer, group, mode: str, pad_id, device, ref_model, beta):
    """The masked loss of one training batch: SFT's, or DPO's against the reference model's log-probs."""
    from ..data import collate, collate_dpo

    if mode == "sft":
        return valuer.value_and_loss(collate(group, pad_id, device=device))
    from ..dpo import dpo_value_and_loss

    batch = collate_dpo(group, pad_id, device=device)
    ref_logps = reference_logprobs(ref_model, batch)
    return dpo_value_and_loss(valuer, batch, ref_logps, beta, indices=[ex["line"] for ex in group])


def _say_progress(step: int, s: dict, history: list, t0: float) -> None:
    recent = history[-s["log_every"]:]
    say(f"step {step + 1}/{s['steps']}  loss {sum(h['loss'] for h in recent) / len(recent):.4f}  "
        f"kept {sum(h['kept'] for h in recent) / max(1, sum(h['response_tokens'] for h in recent)):.0%}"
        f"  {time.perf_counter() - t0:.1f}s")


def _train_loop(valuer, model, optimizer, params, examples, ref_model, s: dict, mode: str, pad_id, device, out: Path,
                history: list, inputs: dict, start_step: int, show) -> None:
    """Steps start_step..s["steps"]: value and mask each batch, step the optimizer, log, checkpoint; the valuer is
    closed at the end."""
    import torch

    from ..progress import progress, progress_enabled

    bars = progress_enabled(show)
    bar = progress(None, "train", total=s["steps"], enabled=show)
    bar.update(start_step)
    t0 = time.perf_counter()
    try:
        for step in range(start_step, s["steps"]):
            group = [examples[i] for i in _batch_indices(step, len(examples), s["batch_size"], s["seed"])]
            loss = _step_loss(valuer, group, mode, pad_id, device, ref_model, s["beta"])
            loss.backward()
            if s["grad_clip"] is not None:
                torch.nn.utils.clip_grad_norm_(params, float(s["grad_clip"]))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tv = valuer.last_values
            kept, seen = int((tv.mask & tv.response).sum()), int(tv.response.sum())
            history.append({"step": step + 1, "loss": float(loss.detach()), "kept": kept, "response_tokens": seen})
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", kept=f"{kept / max(1, seen):.0%}")
            if not bars and ((step + 1) % s["log_every"] == 0 or step + 1 == s["steps"]):
                _say_progress(step, s, history, t0)
            if (step + 1) % s["save_every"] == 0 or step + 1 == s["steps"]:
                _save_checkpoint(out, step + 1, model, optimizer, s, history, s["keep_checkpoints"], inputs)
    finally:
        bar.close()
        valuer.close()


def _keeping_eos(cfg, tokenizer, model_name):
    """`cfg` with the tokenizer's eos token among always_keep_token_ids (keep_eos)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UserError(f"keep_eos: the tokenizer of {model_name} has no eos token; set "
                        "alphatoken: {always_keep_token_ids: [...]} instead")
    return cfg.replace(always_keep_token_ids=tuple(dict.fromkeys(cfg.always_keep_token_ids + (int(eos),))))


def _frozen_copy(model):
    """DPO's reference model: a copy of the policy at θ₀, in eval mode, with no gradients."""
    import copy

    ref_model = copy.deepcopy(model).eval()
    for p in ref_model.parameters():
        p.requires_grad_(False)
    return ref_model
