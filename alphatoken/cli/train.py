"""`alphatoken train`: SFT or DPO with AlphaToken's masked loss, settings from defaults < --config YAML < flags,
checkpoints every --save-every steps and an exact --resume from the newest one."""
from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path
from typing import Optional

from ..errors import UserError
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
    "grad_clip": 1.0,          # max gradient norm; null for none
    "max_length": None,        # tokens per sequence; default: the model's limit
    "seed": 0,
    "save_every": 50,          # checkpoint every N steps (and at the end)
    "keep_checkpoints": 2,     # newest N kept
    "log_every": 10,
    "fisher": "kfac",          # "diag" | "kfac" | "none": reference Fisher at θ₀ for stability
    "fisher_batches": 8,
    "beta": 0.1,               # DPO β
    "device": "auto",
    "alphatoken": {},          # AlphaTokenConfig fields, e.g. {keep_ratio: 0.6, selection: batch}
}
# what may differ between a run and its --resume (everything else must match for the run to continue exactly)
RESUME_MAY_CHANGE = {"steps", "save_every", "keep_checkpoints", "log_every", "device", "out"}


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
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the config must be a mapping of keys to values, got {type(data).__name__}")
    unknown = sorted(set(data) - set(TRAIN_DEFAULTS))
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(TRAIN_DEFAULTS)}")
    if not isinstance(data.get("alphatoken", {}) or {}, dict):
        raise UserError(f"{path}: 'alphatoken' must be a mapping of AlphaTokenConfig fields")
    return data


def _train_settings(args, base: Optional[dict] = None) -> dict:
    """defaults (or a resumed run's settings) < the --config YAML < flags, checked."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (base or TRAIN_DEFAULTS).items()}
    if args.config:
        for k, v in _load_yaml(args.config).items():
            cfg[k] = dict(v or {}) if k == "alphatoken" else v
    for key in ("model", "data", "out", "steps", "batch_size", "lr", "weight_decay", "max_length", "seed",
                "save_every", "fisher", "beta", "device", "log_every", "fisher_batches"):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    if args.dpo:
        cfg["mode"] = "dpo"
    cfg["alphatoken"] = {**(cfg["alphatoken"] or {}), **config_overrides(args)}
    if not cfg["data"]:
        raise UserError("no training data: pass --data FILE.jsonl or set 'data:' in the --config YAML")
    for key in ("steps", "batch_size", "save_every", "log_every", "fisher_batches", "keep_checkpoints"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            raise UserError(f"{key} must be an integer >= 1, got {cfg[key]!r}")
    for key in ("lr", "weight_decay", "beta", "grad_clip"):
        value = cfg[key]
        if key == "grad_clip" and value is None:
            continue
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = cfg[key] = float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UserError(f"{key} must be a number, got {value!r}")
    if cfg["max_length"] is not None and (not isinstance(cfg["max_length"], int) or cfg["max_length"] < 2):
        raise UserError(f"max_length must be an integer >= 2, got {cfg['max_length']!r}")
    if cfg["mode"] not in (None, "sft", "dpo"):
        raise UserError(f"mode must be sft or dpo, got {cfg['mode']!r}")
    if str(cfg["fisher"]) not in ("diag", "kfac", "none", "None"):
        raise UserError(f"fisher must be diag, kfac or none, got {cfg['fisher']!r}")
    cfg["fisher"] = "none" if cfg["fisher"] in (None, "None") else cfg["fisher"]
    cfg["model"], cfg["data"], cfg["out"] = str(cfg["model"]), str(cfg["data"]), str(cfg["out"])
    return cfg


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    root = out / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = re.fullmatch(r"step-(\d+)", p.name)
            if m and (p / "state.json").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


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


def _save_checkpoint(out: Path, step: int, model, optimizer, settings: dict, history: list, keep: int) -> Path:
    import shutil

    import torch
    from safetensors.torch import save_model

    from ..data import atomic_dir

    final = out / "checkpoints" / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "settings": settings, "history": history},
                                                   indent=1), encoding="utf-8")
    for old_step, path in _checkpoints(out)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def _batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The examples of `step`: epochs over the data in a seeded order, reshuffled every epoch (a pure function of
    the step, so a resumed run sees exactly the batches the uninterrupted run would have)."""
    import torch

    per_epoch = math.ceil(n / batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return perm[k * batch_size: (k + 1) * batch_size]


def cmd_train(args) -> int:
    import copy

    import torch

    import alphatoken as at
    from ..data import (atomic_dir, collate, collate_dpo, detect_kind, ensure_output_dir, load_model, pad_id_of,
                        read_jsonl, tokenize_records, write_json)
    from ..progress import progress, progress_enabled

    out = Path(args.out or (_load_yaml(args.config).get("out") if args.config else None) or TRAIN_DEFAULTS["out"])
    found = _checkpoints(out)
    start_step, history, saved = 0, [], None
    if args.resume:
        if not found:
            raise UserError(f"--resume: no checkpoint under {out / 'checkpoints'}; start without --resume")
        start_step, ckpt = found[-1]
        saved = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        history = saved["history"]
    elif found:
        raise UserError(f"{out}: already has checkpoints (last: step {found[-1][0]}); pass --resume to continue "
                        "or choose another --out")
    s = _train_settings(args, base=saved["settings"] if saved else None)
    s["out"] = str(out)
    if saved:
        for key, value in saved["settings"].items():
            if key not in RESUME_MAY_CHANGE and s.get(key) != value:
                raise UserError(
                    f"--resume: {key} is {s.get(key)!r} now but {value!r} in {ckpt}; resume with the same "
                    f"settings (only {', '.join(sorted(RESUME_MAY_CHANGE - {'out'}))} may change)")
        if start_step >= s["steps"]:
            raise UserError(f"--resume: the checkpoint is at step {start_step} and steps is {s['steps']}; "
                            "raise --steps to train further")

    records = read_jsonl(s["data"])
    kind = detect_kind(records)
    mode = s["mode"] or kind
    if mode != kind:
        need = "prompt/chosen/rejected" if mode == "dpo" else "prompt/response"
        raise UserError(f"{s['data']}: mode {mode} needs {need} records, but the file has {kind} records")
    s["mode"] = mode
    ensure_output_dir(out)
    cfg = valuation_config(s["alphatoken"])
    device = resolve_device(s["device"])
    show = progress_setting(args.quiet)

    random.seed(s["seed"])
    torch.manual_seed(s["seed"])
    model, tokenizer = load_model(s["model"], device=device)
    model.train()
    max_length = max_length_for(model, tokenizer, s["max_length"])
    examples = tokenize_records(records, tokenizer, kind, max_length=max_length)
    pad_id = pad_id_of(tokenizer)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}  # θ₀
    ref_model = None
    if mode == "dpo":
        ref_model = copy.deepcopy(model).eval()
        for p in ref_model.parameters():
            p.requires_grad_(False)

    fisher = None
    fisher_path = out / "fisher.safetensors"
    if s["fisher"] != "none":
        if args.resume and fisher_path.is_file():
            fisher = at.Fisher.load(str(fisher_path), device=device)
        else:
            fisher = estimate_fisher(model, examples, mode, fisher=s["fisher"], batch_size=s["batch_size"],
                                     n_batches=s["fisher_batches"], pad_id=pad_id, device=device, show=show)
            save_fisher(fisher, fisher_path)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"])
    if start_step:
        from safetensors.torch import load_model as load_weights

        load_weights(model, str(ckpt / "model.safetensors"), strict=True, device=str(device))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
        say(f"resuming from {ckpt} (step {start_step})")
    else:
        torch.manual_seed(s["seed"])

    say(f"training ({mode.upper()} with AlphaToken, keep {cfg.keep_ratio:.0%}) on {len(examples)} "
        f"{'examples' if mode == 'sft' else 'pairs'} from {s['data']}: steps {start_step}→{s['steps']}, "
        f"batch {s['batch_size']}, lr {s['lr']}, device {device}; output {out}")
    valuer = new_valuer(model, cfg, fisher, reference=reference)
    bars = progress_enabled(show)
    bar = progress(None, "train", total=s["steps"], enabled=show)
    bar.update(start_step)
    t0 = time.perf_counter()
    try:
        for step in range(start_step, s["steps"]):
            group = [examples[i] for i in _batch_indices(step, len(examples), s["batch_size"], s["seed"])]
            if mode == "sft":
                batch = collate(group, pad_id, device=device)
                loss = valuer.value_and_loss(batch)
            else:
                from ..dpo import dpo_value_and_loss

                batch = collate_dpo(group, pad_id, device=device)
                ref_logps = reference_logprobs(ref_model, batch)
                loss = dpo_value_and_loss(valuer, batch, ref_logps, s["beta"],
                                          indices=[ex["line"] for ex in group])
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
                recent = history[-s["log_every"]:]
                say(f"step {step + 1}/{s['steps']}  loss {sum(h['loss'] for h in recent) / len(recent):.4f}  "
                    f"kept {sum(h['kept'] for h in recent) / max(1, sum(h['response_tokens'] for h in recent)):.0%}"
                    f"  {time.perf_counter() - t0:.1f}s")
            if (step + 1) % s["save_every"] == 0 or step + 1 == s["steps"]:
                _save_checkpoint(out, step + 1, model, optimizer, s, history, s["keep_checkpoints"])
    finally:
        bar.close()
        valuer.close()
    with atomic_dir(out / "final") as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    tokens = sum(h["kept"] for h in history)
    seen = sum(h["response_tokens"] for h in history)
    write_json(out / "metrics.json", {"settings": s, "steps": s["steps"], "tokens_trained": tokens,
                                      "response_tokens": seen, "history": history})
    say(f"done: {s['steps']} steps, trained on {tokens} of {seen} response tokens ({tokens / max(1, seen):.0%}); "
        f"final model {out / 'final'}, checkpoints {out / 'checkpoints'}")
    return 0

