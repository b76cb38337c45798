"""The `alphatoken` console script.

    alphatoken demo  [--steps N] [--out DIR]           every token vs AlphaToken on the built-in tiny model + data
    alphatoken score DATA.jsonl [--model DIR|builtin]  value a dataset; write values, masks and the HTML report
    alphatoken train [--config run.yaml] [flags]       SFT or DPO with AlphaToken; checkpoints; --resume
    alphatoken bench [--quick] [--cpu]                 the kernel benchmarks, as a table

Bad input ends with one line on stderr (`alphatoken: error: ...`) and exit status 2; any other failure with
one line and status 1 (`ALPHATOKEN_DEBUG=1` shows the traceback). Outputs are written to temporary paths and
renamed into place when complete. Progress bars go to stderr when it is a terminal (`--quiet` turns them off).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import UserError

DEFAULT_OUT = "alphatoken_out"
PROG = "alphatoken"


# ===================================================================================================== helpers


def _say(*args) -> None:
    print(*args, flush=True)


def _device(name: Optional[str]):
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


def _make_config(values: dict):
    """An AlphaTokenConfig from a dict, with bad keys or values reported as one line."""
    from .config import AlphaTokenConfig
    import dataclasses

    known = {f.name for f in dataclasses.fields(AlphaTokenConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown AlphaToken setting(s) {unknown}; valid: {sorted(known)}")
    try:
        return AlphaTokenConfig(**values)
    except (ValueError, TypeError) as err:
        raise UserError(f"bad AlphaToken setting: {err}") from None


def _config_overrides(args) -> dict:
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


def _max_length(model, tokenizer, requested: Optional[int]) -> Optional[int]:
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


def _round(x: float) -> float:
    return float(f"{x:.7g}") if math.isfinite(x) else x


def _estimate_fisher(model, batches, kind: str, show: Optional[bool]):
    import alphatoken as at

    if kind == "none":
        return None
    if kind not in ("diag", "kfac"):
        raise UserError(f"--fisher must be diag, kfac or none; got {kind!r}")
    return at.estimate_fisher(model, batches, kind=kind, progress=show)


def _save_fisher(fisher, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fisher.save(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _add_valuation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("valuation (AlphaTokenConfig)")
    g.add_argument("--keep-ratio", type=float, default=None, help="share of response tokens kept (default 0.6)")
    g.add_argument("--selection", choices=("batch", "sequence", "threshold"), default=None,
                   help="how tokens are picked (default batch)")
    g.add_argument("--stability-weight", type=float, default=None, help="λ in total = adaptation + λ·stability")
    g.add_argument("--causal-weight", type=float, default=None, help="γ, weight of the downstream causal path")
    g.add_argument("--paths", choices=("full", "direct"), default=None,
                   help="full (direct + causal) or direct (head only, cheapest)")
    g.add_argument("--tracked-layers", default=None, help="'all', k (last k blocks + head) or a regex")


# ======================================================================================================== demo


def _demo_table(result: dict) -> tuple[str, list[dict]]:
    """The printed comparison and the same numbers as rows for the report."""
    methods = result["methods"]
    names = [("full", "every token"), ("alphatoken", "AlphaToken")]
    names = [(k, label) for k, label in names if k in methods]
    before = result.get("before", {})
    lines: list[tuple[str, list[str]]] = []

    def pct(x):
        return f"{100 * x:.1f}%"

    lines.append(("target exact match" + (f" (before {pct(before['target'])})" if "target" in before else ""),
                  [pct(methods[k]["target_exact_match"]) for k, _ in names]))
    tasks = list(methods[names[0][0]]["retention_after"])
    for task in tasks:
        b = methods[names[0][0]]["retention_before"].get(task, before.get(task))
        lines.append((f"retention {task} (before {pct(b)})" if b is not None else f"retention {task}",
                       [pct(methods[k]["retention_after"][task]) for k, _ in names]))
    lines.append(("mean forgetting (points)",
                  [f"{100 * sum(methods[k]['forgetting'].values()) / max(1, len(tasks)):.1f}" for k, _ in names]))
    lines.append(("tokens trained", [f"{methods[k]['tokens_trained']:,.0f}" for k, _ in names]))
    if all("response_tokens" in methods[k] for k, _ in names):
        lines.append(("  of response tokens seen",
                      [f"{methods[k]['tokens_trained'] / max(1.0, methods[k]['response_tokens']):.0%}"
                       for k, _ in names]))
    if "noise_dropped_share" in methods.get("alphatoken", {}):
        lines.append(("known-noise tokens dropped",
                      [pct(methods[k].get("noise_dropped_share", 0.0)) for k, _ in names]))
    lines.append(("fine-tuning time", [f"{methods[k]['wall_time']:.1f} s" for k, _ in names]))
    w0 = max(len(label) for label, _ in lines)
    w = max(12, *(len(v) for _, vals in lines for v in vals), *(len(label) for _, label in names))
    head = " " * w0 + "  " + "  ".join(label.rjust(w) for _, label in names)
    text = "\n".join([head, "-" * len(head)] + [label.ljust(w0) + "  " + "  ".join(v.rjust(w) for v in vals)
                                                 for label, vals in lines])
    rows = [{"metric": label.strip(), **{lab: v for (_, lab), v in zip(names, vals)}} for label, vals in lines]
    return text, rows


def _demo_examples(example: dict, tokenizer) -> tuple[list[dict], Any]:
    """Report inputs from the toy's scored batch: one example per row, padding stripped, noise as flags."""
    batch = example["batch"]
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = batch["labels"]
    noise = example.get("noise")
    rows = []
    for b in range(ids.shape[0]):
        n = int(mask[b].sum()) if mask is not None else ids.shape[1]
        lab = labels[b, :n].tolist()
        start = next((i for i, x in enumerate(lab) if x != -100), n)
        row = {"index": b, "input_ids": ids[b, :n].tolist(), "labels": lab,
               "prompt": tokenizer.decode(ids[b, :start].tolist(), skip_special_tokens=True)}
        if noise is not None:
            row["flags"] = noise[b, :n].tolist()
        rows.append(row)
    return rows, example["values"]


def cmd_demo(args) -> int:
    out = Path(args.out)
    from .data import ensure_output_dir, write_json
    from .report import write_report

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if not 0.0 < args.keep_ratio <= 1.0:
        raise UserError(f"--keep-ratio must be in (0, 1], got {args.keep_ratio}")
    ensure_output_dir(out)
    from . import toy

    steps = args.steps if args.steps is not None else toy.DEFAULTS["steps"]
    show = not args.quiet
    _say(f"AlphaToken demo: fine-tuning the built-in tiny Llama on the noisy '{toy.TARGET_TASK}' task, "
         f"{steps} steps, once with every token and once with AlphaToken (keep {args.keep_ratio:.0%}).")
    t0 = time.perf_counter()
    kwargs = dict(steps=steps, seeds=(args.seed,), keep_ratio=args.keep_ratio, progress=show)
    if args.fisher is not None:
        kwargs["fisher"] = None if args.fisher == "none" else args.fisher
    result = toy.compare(**kwargs)
    wall = time.perf_counter() - t0
    table, rows = _demo_table(result)
    _say("")
    _say(table)
    _say("")
    _say(f"total wall time {wall:.0f} s")

    settings = result.get("settings", {})
    summary = {"model": "built-in tiny Llama (alphatoken.toy)", "target task": toy.TARGET_TASK,
               "steps": steps, "seed": args.seed, "keep ratio": args.keep_ratio,
               "Fisher": settings.get("fisher", args.fisher), "demo wall time": f"{wall:.0f} s"}
    _, tokenizer = toy.load_builtin()
    examples, values = _demo_examples(result["example"], tokenizer)
    report = out / "report.html"
    write_report(report, examples, values, tokenizer, title="AlphaToken demo: which tokens are kept",
                 summary=summary, comparison=rows, config=settings.get("config"),
                 notes=["The responses below are noisy target-task training examples scored at the pre-trained "
                        "weights. Purple-underlined tokens are the known noise (filler, corrupted digits, "
                        "swapped spans) that a good valuation should drop."],
                 flag_label="known noise")
    write_json(out / "demo.json", _jsonable({k: v for k, v in result.items() if k != "example"}
                                            | {"wall_time": wall}))
    _say(f"report: {report}")
    _say(f"numbers: {out / 'demo.json'}")
    return 0


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, (int, str, bool)) or obj is None:
        return obj
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


# ======================================================================================================= score


def _score_rows(valuer, examples: list[dict], kind: str, pad_id: int, batch_size: int, device, beta: float,
                show: Optional[bool]) -> list[dict]:
    """Per-row value tensors (1-D, length of the row) in report order (DPO: chosen then rejected per pair)."""
    import torch

    from .data import chunks, collate, collate_dpo
    from .progress import progress

    fields = ("adaptation", "stability", "direct", "causal", "total", "mask", "response")
    rows: dict[tuple, dict] = {}
    groups = chunks(examples, batch_size)
    for group in progress(groups, "scoring", total=len(groups), enabled=show):
        if kind == "sft":
            batch = collate(group, pad_id, device=device)
            tv = valuer.value(batch).detach_cpu()
            keys = [(ex["index"], None) for ex in group]
            lengths = [len(ex["input_ids"]) for ex in group]
        else:
            from .dpo import dpo_token_weights
            from .losses import response_mask, token_logprobs
            from .engine import model_inputs

            batch = collate_dpo(group, pad_id, device=device)
            with torch.no_grad():
                logits = valuer.model(**model_inputs(valuer.model, batch)).logits
                ref = token_logprobs(logits, batch["labels"])
            del logits
            resp = response_mask(batch["labels"])
            tv = valuer.value(batch, token_weights=dpo_token_weights(ref, beta, resp)).detach_cpu()
            keys = [(ex["index"], "chosen") for ex in group] + [(ex["index"], "rejected") for ex in group]
            lengths = ([len(ex["chosen_input_ids"]) for ex in group]
                       + [len(ex["rejected_input_ids"]) for ex in group])
        for r, (key, n) in enumerate(zip(keys, lengths)):
            rows[key] = {f: getattr(tv, f)[r, :n].clone() for f in fields}
    order = ([(ex["index"], None) for ex in examples] if kind == "sft"
             else [(ex["index"], part) for ex in examples for part in ("chosen", "rejected")])
    return [rows[k] for k in order]


def _stack(rows: list[dict]):
    """One TokenValues (R, T_max) from per-row 1-D fields, right-padded."""
    import torch

    from .values import TokenValues

    width = max(r["total"].numel() for r in rows)
    out = {}
    for f in ("adaptation", "stability", "direct", "causal", "total", "mask", "response"):
        dtype = torch.bool if f in ("mask", "response") else torch.float32
        t = torch.zeros(len(rows), width, dtype=dtype)
        for i, r in enumerate(rows):
            t[i, : r[f].numel()] = r[f]
        out[f] = t
    return TokenValues(**out)


def _value_record(prefix: str, ids: list, labels: list, row: dict, tokenizer) -> dict:
    """One response's per-token fields, aligned with input_ids; column names as `alphatoken.offline` uses them,
    so `alphatoken.offline.apply_masks(datasets.load_dataset("json", ...))` trains from these masks directly."""
    keep = [int(bool(m)) for m in row["mask"].tolist()]
    resp = [int(bool(r)) for r in row["response"].tolist()]
    rec = {
        f"{prefix}input_ids": ids,
        f"{prefix}labels": labels,
        f"{prefix}tokens": [tokenizer.decode([i], skip_special_tokens=False) for i in ids],
        f"{prefix}alphatoken_keep": keep,
        f"{prefix}alphatoken_response": resp,
    }
    for f in ("total", "adaptation", "stability", "direct", "causal"):
        rec[f"{prefix}alphatoken_{f}"] = [_round(x) for x in row[f].tolist()]
    rec[f"{prefix}masked_labels"] = [l if k else -100 for l, k in zip(labels, keep)]
    n, k = sum(resp), sum(a and b for a, b in zip(keep, resp))
    rec[f"{prefix}n_valued"], rec[f"{prefix}n_kept"] = n, k
    rec[f"{prefix}keep_ratio"] = _round(k / n) if n else 0.0
    return rec


def cmd_score(args) -> int:
    import torch

    from .data import (chunks, collate, ensure_output_dir, pad_id_of, read_jsonl, detect_kind, load_model,
                       split_pairs, tokenize_records, write_json, write_jsonl, atomic_output)
    from .report import render_report
    from .select import select_local

    t0 = time.perf_counter()
    records = read_jsonl(args.data)
    kind = detect_kind(records)
    out = ensure_output_dir(args.out)
    cfg = _make_config({"keep_ratio": 0.6, **_config_overrides(args)})
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = _device(args.device)
    show = False if args.quiet else None  # None: bars only on a terminal
    model, tokenizer = load_model(args.model, device=device)
    max_length = _max_length(model, tokenizer, args.max_length)
    examples = tokenize_records(records, tokenizer, kind, max_length=max_length, add_eos=not args.no_eos)
    pad_id = pad_id_of(tokenizer)
    n_rows = len(examples) * (1 if kind == "sft" else 2)
    _say(f"scoring {len(examples)} {'prompt/response' if kind == 'sft' else 'preference pair'} records "
         f"({n_rows} responses) from {args.data} with model {args.model} on {device}")

    import alphatoken as at

    fisher = None
    if args.fisher != "none":
        rows_for_fisher = examples if kind == "sft" else split_pairs(examples)
        groups = chunks(rows_for_fisher, args.batch_size)[: max(1, args.fisher_batches)]
        batches = [collate(g, pad_id, device=device) for g in groups]
        torch.manual_seed(args.seed)
        fisher = _estimate_fisher(model, batches, args.fisher, show)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fisher=None.*")
        valuer = at.AlphaToken(model, cfg, fisher=fisher)
    try:
        rows = _score_rows(valuer, examples, kind, pad_id, args.batch_size, device, args.beta, show)
    finally:
        valuer.close()
    stacked = _stack(rows)
    if args.select_within == "dataset":  # one selection over the whole file: masks do not depend on batching
        stacked.mask = select_local(stacked.total, stacked.response, cfg)
        for i, r in enumerate(rows):
            r["mask"] = stacked.mask[i, : r["mask"].numel()].clone()

    report_rows = examples if kind == "sft" else split_pairs(examples)
    records_out = []
    for i, ex in enumerate(examples):
        rec = {"index": ex["index"], "line": ex["line"], "prompt": ex["prompt"]}
        if kind == "sft":
            rec["response"] = ex["response"]
            rec.update(_value_record("", ex["input_ids"], ex["labels"], rows[i], tokenizer))
        else:
            rec["chosen"], rec["rejected"] = ex["chosen"], ex["rejected"]
            for j, part in enumerate(("chosen", "rejected")):
                rec.update(_value_record(f"{part}_", ex[f"{part}_input_ids"], ex[f"{part}_labels"],
                                         rows[2 * i + j], tokenizer))
        records_out.append(rec)

    n_valued = int(stacked.response.sum())
    n_kept = int((stacked.mask & stacked.response).sum())
    summary = {
        "data": str(args.data), "kind": kind, "records": len(examples), "responses": n_rows,
        "model": str(args.model), "device": str(device), "fisher": args.fisher,
        "response_tokens_valued": n_valued, "kept": n_kept,
        "keep_ratio": _round(n_kept / n_valued) if n_valued else 0.0,
        "selection_over": args.select_within, "max_length": max_length,
        "config": cfg.to_dict(), "wall_time_s": round(time.perf_counter() - t0, 2),
        "files": {"values": "values.jsonl", "report": "report.html", "summary": "summary.json"},
        "values_format": "JSONL, one record per input line (datasets.load_dataset('json', data_files=...) reads "
                         "it). Per-token lists aligned with input_ids: alphatoken_keep (1 = kept), "
                         "alphatoken_response (1 = valued response token), alphatoken_total / _adaptation / "
                         "_stability / _direct / _causal (0 off the response), tokens (decoded), masked_labels "
                         "(labels with every token not kept set to -100). DPO: the same fields prefixed chosen_ "
                         "and rejected_. alphatoken.offline.apply_masks(dataset) trains from the SFT masks.",
        "alphatoken_version": at.__version__,
    }
    html_text = render_report(
        report_rows, _stack(rows), tokenizer, title=f"AlphaToken values: {Path(args.data).name}",
        summary={"model": str(args.model), "Fisher": args.fisher, "selection": f"{cfg.selection} over the "
                 f"{args.select_within}", "keep ratio (target)": cfg.keep_ratio},
        config=cfg.to_dict(), max_sequences=args.report_limit,
    )
    # everything is computed; now the files, each written beside its final name and renamed into place
    write_jsonl(out / "values.jsonl", records_out)
    with atomic_output(out / "report.html") as fh:
        fh.write(html_text)
    write_json(out / "summary.json", summary)
    if args.save_fisher and fisher is not None:
        _save_fisher(fisher, out / "fisher.safetensors")
    _say(f"kept {n_kept} of {n_valued} response tokens ({n_kept / max(1, n_valued):.1%}); "
         f"wrote {out / 'values.jsonl'}, {out / 'report.html'}, {out / 'summary.json'}")
    return 0


# ======================================================================================================= train

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
    cfg["alphatoken"] = {**(cfg["alphatoken"] or {}), **_config_overrides(args)}
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

    from .data import atomic_dir

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
    import warnings

    import torch

    import alphatoken as at
    from .data import (atomic_dir, chunks, collate, collate_dpo, detect_kind, ensure_output_dir, load_model,
                       pad_id_of, read_jsonl, split_pairs, tokenize_records, write_json)
    from .progress import progress, progress_enabled

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
    cfg = _make_config({"keep_ratio": 0.6, **s["alphatoken"]})
    device = _device(s["device"])
    show = False if args.quiet else None  # None: bars only on a terminal

    random.seed(s["seed"])
    torch.manual_seed(s["seed"])
    model, tokenizer = load_model(s["model"], device=device)
    model.train()
    max_length = _max_length(model, tokenizer, s["max_length"])
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
            rows = examples if mode == "sft" else split_pairs(examples)
            groups = chunks(rows, s["batch_size"])[: s["fisher_batches"]]
            fisher = _estimate_fisher(model, [collate(g, pad_id, device=device) for g in groups], s["fisher"], show)
            _save_fisher(fisher, fisher_path)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"])
    if start_step:
        from safetensors.torch import load_model as load_weights

        load_weights(model, str(ckpt / "model.safetensors"), strict=True, device=str(device))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=True))
        _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
        _say(f"resuming from {ckpt} (step {start_step})")
    else:
        torch.manual_seed(s["seed"])

    _say(f"training ({mode.upper()} with AlphaToken, keep {cfg.keep_ratio:.0%}) on {len(examples)} "
         f"{'examples' if mode == 'sft' else 'pairs'} from {s['data']}: steps {start_step}→{s['steps']}, "
         f"batch {s['batch_size']}, lr {s['lr']}, device {device}; output {out}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fisher=None.*")
        valuer = at.AlphaToken(model, cfg, fisher=fisher, reference=reference)
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
                from .dpo import dpo_value_and_loss
                from .engine import model_inputs
                from .losses import token_logprobs

                batch = collate_dpo(group, pad_id, device=device)
                with torch.no_grad():
                    ref_logps = token_logprobs(ref_model(**model_inputs(ref_model, batch)).logits, batch["labels"])
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
                _say(f"step {step + 1}/{s['steps']}  loss {sum(h['loss'] for h in recent) / len(recent):.4f}  "
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
    _say(f"done: {s['steps']} steps, trained on {tokens} of {seen} response tokens ({tokens / max(1, seen):.0%}); "
         f"final model {out / 'final'}, checkpoints {out / 'checkpoints'}")
    return 0


# ======================================================================================================= bench


def _find_bench_script() -> Optional[Path]:
    candidates = []
    if os.environ.get("ALPHATOKEN_BENCHMARKS"):
        candidates.append(Path(os.environ["ALPHATOKEN_BENCHMARKS"]) / "gpu_bench.py")
    candidates.append(Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_bench.py")
    candidates.append(Path.cwd() / "benchmarks" / "gpu_bench.py")
    for c in candidates:
        if c.is_file():
            return c
    return None


def _builtin_bench(quick: bool) -> list[dict]:
    """A small timing of alphatoken.kernels against plain torch and materialized per-token gradients."""
    import torch

    import alphatoken.kernels as K

    torch.manual_seed(0)
    shapes = [(128, 64, 64)] if quick else [(256, 128, 128), (1024, 256, 256)]
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: steadier medians on a shared machine
    try:
        _time_cases(K, shapes, rows, quick)
    finally:
        torch.set_num_threads(threads)
    return rows


def _time_cases(K, shapes, rows, quick):
    import statistics

    import torch

    def timeit(fn, reps=3 if quick else 7):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    for N, d_in, d_out in shapes:
        a, g = torch.randn(N, d_in), torch.randn(N, d_out)
        M, F = torch.randn(d_out, d_in), torch.rand(d_out, d_in)
        V = 32
        a_ref, g_ref = torch.randn(V, d_in), torch.randn(V, d_out)
        n_mat = min(N, 64)  # per-token gradients get big fast: time a slice, scale to N
        cases = {
            "bilinear": {
                "alphatoken": lambda: K.bilinear(a, g, M),
                "torch": lambda: ((g @ M) * a).sum(-1),
                "materialized": lambda: torch.einsum("no,ni,oi->n", g[:n_mat], a[:n_mat], M),
            },
            "fisher_norm": {
                "alphatoken": lambda: K.fisher_norm(a, g, F),
                "torch": lambda: (((g * g) @ F) * (a * a)).sum(-1),
                "materialized": lambda: ((g[:n_mat, :, None] * a[:n_mat, None, :]) ** 2 * F).sum((1, 2)),
            },
            "ghost_dot": {
                "alphatoken": lambda: K.ghost_dot(a, g, a_ref, g_ref),
                "torch": lambda: ((g @ g_ref.T) * (a @ a_ref.T)).sum(-1),
                "materialized": lambda: ((g[:n_mat, :, None] * a[:n_mat, None, :])
                                         * (g_ref.T @ a_ref)).sum((1, 2)),
            },
        }
        for op, providers in cases.items():
            for provider, fn in providers.items():
                ms = timeit(fn)
                if provider == "materialized":
                    ms *= N / n_mat
                backend = K.backend_for(a) if provider == "alphatoken" else "torch"
                rows.append({"op": op, "N": N, "d_in": d_in, "d_out": d_out, "provider": provider,
                             "backend": backend, "median_ms": ms})


def _format_rows(rows: list[dict]) -> str:
    cols = ["op", "N", "d_in", "d_out", "provider", "backend", "median_ms", "vs_torch"]
    torch_ms = {(r["op"], r["N"], r["d_in"]): r["median_ms"] for r in rows if r["provider"] == "torch"}
    table = [cols]
    for r in rows:
        base = torch_ms.get((r["op"], r["N"], r["d_in"]))
        table.append([str(r["op"]), str(r["N"]), str(r["d_in"]), str(r["d_out"]), r["provider"], r["backend"],
                      f"{r['median_ms']:.3f}", f"{base / r['median_ms']:.2f}x" if base else "-"])
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def cmd_bench(args) -> int:
    import torch

    script = None if args.builtin else _find_bench_script()
    cpu = args.cpu or not torch.cuda.is_available()
    if script is not None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("alphatoken_gpu_bench", script)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        _say(f"running {script} ({'cpu' if cpu else 'gpu'}{', quick' if args.quick else ''})")
        kwargs = dict(quick=args.quick, cpu=cpu, step=not args.no_step, csv_path=args.csv)
        if args.no_compile:
            kwargs["compile"] = False
        if args.ops:
            kwargs["ops"] = args.ops
        rows = mod.run(**kwargs)
        _say(mod.format_table(rows))
        if args.csv:
            _say(f"rows written to {args.csv}")
        return 0 if all(r.get("status") != "error" for r in rows) else 1
    _say(("--builtin" if args.builtin else "benchmarks/gpu_bench.py not found") + ": timing alphatoken.kernels against plain torch on "
         f"{'CPU' if cpu else 'CUDA'} (small shapes; median ms, materialized scaled from a 64-token slice)")
    rows = _builtin_bench(args.quick)
    _say(_format_rows(rows))
    if args.csv:
        from .data import atomic_output

        with atomic_output(args.csv) as fh:
            fh.write(",".join(rows[0]) + "\n")
            for r in rows:
                fh.write(",".join(str(v) for v in r.values()) + "\n")
    return 0


# ======================================================================================================== main


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, description="AlphaToken: value every response token on adaptation and stability, and train "
                               "only on the ones worth it.")
    parser.add_argument("--version", action="version", version=f"alphatoken {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,score,train,bench}")

    p = sub.add_parser("demo", help="every token vs AlphaToken on the built-in tiny model and data (CPU, minutes)",
                       description="Fine-tune the built-in tiny Llama on its noisy target task twice — with every "
                                   "response token and with AlphaToken — print the comparison and write the HTML "
                                   "report of which tokens are kept.")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT}/)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (default: the toy's 150)")
    p.add_argument("--keep-ratio", type=float, default=0.6, help="share of response tokens AlphaToken keeps")
    p.add_argument("--fisher", choices=("diag", "kfac", "none"), default=None, help="reference Fisher (default kfac)")
    p.add_argument("--seed", type=int, default=0)
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("score", help="value a JSONL dataset; write values, masks and the HTML report",
                       description="Value every response token of a JSONL dataset at the model's weights and write "
                                   "OUT/values.jsonl (per-token values and keep masks, readable by "
                                   "datasets.load_dataset('json')), OUT/report.html and OUT/summary.json.")
    p.add_argument("data", help="JSONL: {prompt, response} or {prompt, chosen, rejected} per line")
    p.add_argument("--model", default="builtin", help="local Hugging Face model folder, or 'builtin' (default)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT}/)")
    p.add_argument("--fisher", choices=("diag", "kfac", "none"), default="kfac",
                   help="reference Fisher for stability, estimated on the data (default kfac)")
    p.add_argument("--fisher-batches", type=int, default=8, help="batches used to estimate the Fisher")
    p.add_argument("--save-fisher", action="store_true", help="also write OUT/fisher.safetensors")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None, help="truncate sequences (default: the model's limit)")
    p.add_argument("--select-within", choices=("dataset", "batch"), default="dataset",
                   help="select kept tokens over the whole file (default; masks independent of batching) or per "
                        "scoring batch as in training")
    p.add_argument("--beta", type=float, default=0.1, help="DPO β for preference data")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS to responses")
    p.add_argument("--report-limit", type=int, default=200, help="sequences shown in the report")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    _add_valuation_flags(p)
    _add_common(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("train", help="SFT or DPO with AlphaToken from a YAML file and/or flags",
                       description="Fine-tune with AlphaToken's masked loss (SFT, or DPO for prompt/chosen/rejected "
                                   "data). Checkpoints (model, optimizer, step, RNG) every --save-every steps under "
                                   "OUT/checkpoints; --resume continues exactly from the newest one. Settings: "
                                   "defaults < --config YAML < flags. YAML keys: " + ", ".join(TRAIN_DEFAULTS))
    p.add_argument("--config", default=None, help="YAML file of settings")
    p.add_argument("--model", default=None, help="local Hugging Face model folder or 'builtin'")
    p.add_argument("--data", default=None, help="JSONL training data")
    p.add_argument("--out", default=None, help="run folder (default ./alphatoken_run)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--fisher", choices=("diag", "kfac", "none"), default=None)
    p.add_argument("--fisher-batches", type=int, default=None)
    p.add_argument("--dpo", action="store_true", help="DPO (the default when the data has chosen/rejected)")
    p.add_argument("--beta", type=float, default=None, help="DPO β")
    p.add_argument("--device", default=None)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    _add_valuation_flags(p)
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="run the kernel benchmarks and print the table",
                       description="Run benchmarks/gpu_bench.py (kernels vs torch, torch.compile and materialized "
                                   "per-token gradients, then the training-step cost) and print its table; without "
                                   "that script, time alphatoken.kernels against plain torch.")
    p.add_argument("--quick", action="store_true", help="a few sizes only")
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the default without CUDA)")
    p.add_argument("--no-step", action="store_true", help="kernels only, not the training-step benchmark")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    p.add_argument("--ops", nargs="*", default=None, help="only these kernel ops")
    p.add_argument("--csv", default=None, help="also write the rows here")
    p.add_argument("--builtin", action="store_true", help="the small built-in timing even if the script exists")
    _add_common(p)
    p.set_defaults(func=cmd_bench)
    return parser


def _quiet_transformers() -> None:
    """transformers' own bars (weight loading) follow our rule: only on a terminal, never with --quiet."""
    from .progress import progress_enabled

    if progress_enabled():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing or very old
        pass


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 500 else text[:497] + "..."


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors: argparse already printed
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    from .progress import set_progress

    if getattr(args, "quiet", False):
        set_progress(False)
    debug = os.environ.get("ALPHATOKEN_DEBUG", "") not in ("", "0")
    try:
        if args.command != "bench":
            _quiet_transformers()
        return int(args.func(args) or 0)
    except UserError as err:
        if debug:
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # not the user's input: still one line, with the way to the traceback
        if debug:
            raise
        where = f"{err.filename}: " if isinstance(err, OSError) and getattr(err, "filename", None) else ""
        print(f"{PROG}: error: {where}{type(err).__name__}: {_one_line(err)} "
              f"(set ALPHATOKEN_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        if getattr(args, "quiet", False):
            set_progress(None)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
