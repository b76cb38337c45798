"""`alphatoken score DATA.jsonl`: value every response token of a dataset at the model's weights and write
OUT/values.jsonl (values and keep masks per token), OUT/report.html and OUT/summary.json."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .retention import BUILTIN, check_retention, retention_batch, retention_tokens
from .shared import (RunError, config_overrides, estimate_fisher, max_length_for, new_valuer, progress_setting,
                     resolve_device, response_rows, say, valuation_config)


def _round(x: float) -> float:
    return float(f"{x:.7g}") if math.isfinite(x) else x


def _score_rows(valuer, examples: list[dict], kind: str, pad_id: int, batch_size: int, device, beta: float,
                show: Optional[bool]) -> list[dict]:
    """Per-row value tensors (1-D, length of the row) in report order (DPO: chosen then rejected per pair), from
    the library's scoring loop (`alphatoken.offline.value_rows`; DPO credits of each batch's mean loss)."""
    from ..offline import value_rows

    if kind == "sft":
        sides = {None: ([ex["input_ids"] for ex in examples], [ex["labels"] for ex in examples])}
    else:
        sides = {part: ([ex[f"{part}_input_ids"] for ex in examples], [ex[f"{part}_labels"] for ex in examples])
                 for part in ("chosen", "rejected")}
    rows = {(side, i): row for side, i, row in value_rows(
        valuer, sides, batch_size=batch_size, pad_token_id=pad_id, device=device, ref_model=valuer.model,
        beta=beta, credit="batch", show=show)}
    return [rows[(side, i)] for i in range(len(examples)) for side in sides]


def _stack(rows: list[dict]):
    """One TokenValues (R, T_max) from per-row 1-D fields, right-padded."""
    import torch

    from ..values import TokenValues

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


OUTPUT_NAMES = ("values.jsonl", "report.html", "summary.json", "fisher.safetensors")


def check_paths(data, model, validation, out: Path, retention: Optional[str] = None) -> None:
    """UserError unless writing OUT (which score replaces whole) leaves every input alone: the data, the
    validation file and the model folder must not lie inside --out, and an existing --out may hold only
    score's own outputs."""
    from .shared import is_within, model_folder

    inputs = [("the data file", data), ("the --validation file", validation)]
    if retention not in (None, BUILTIN):
        inputs.append(("the --retention file", retention))
    folder = model_folder(model) if model not in (None, "", "builtin") else None
    inputs.append(("the --model folder", folder))
    for what, path in inputs:
        if path is not None and is_within(path, out):
            raise UserError(f"--out {out}: {what} {path} lies inside it, and score replaces that folder whole with "
                            "its new outputs; pass another --out")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_NAMES)
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise UserError(f"--out {out}: holds files score did not write ({shown}), and score replaces that folder "
                            "whole; pass a new or empty --out")
    elif out.exists():
        raise UserError(f"--out {out}: not a folder; pass a folder path")


def validation_batches(path, tokenizer, pad_id: int, *, max_length, batch_size: Optional[int], device,
                       add_eos: bool = True) -> list[dict]:
    """The --validation file (clean prompt/response JSONL) as batches: the whole file in one batch unless
    `batch_size` is given, so the validation direction does not depend on the scoring batch size."""
    from ..data import chunks, collate, detect_kind, read_jsonl, tokenize_records

    records = read_jsonl(path)
    if detect_kind(records) != "sft":
        raise UserError(f"--validation {path}: needs prompt/response records (the clean target), not preference "
                        "pairs")
    examples = tokenize_records(records, tokenizer, "sft", max_length=max_length, add_eos=add_eos)
    size = batch_size or len(examples)
    return [collate(g, pad_id, device=device) for g in chunks(examples, size)]


def check_validation_target(overrides: dict, validation, where: str = "--validation", retention=None) -> dict:
    """The config overrides with the target a validation file selects when target is not set, as the library's
    target="auto" does: "tuned" (a copy of the model tuned on the file, DESIGN §3.6, §3.9), or "validation" with a
    retention batch (§3.8); UserError when they disagree."""
    target = overrides.get("target")
    if validation is not None:
        if target is None:
            return {**overrides, "target": "validation" if retention is not None else "tuned"}
        if target not in ("validation", "tuned"):
            raise UserError(f"{where} is given but target is {target!r}; drop one, or set target validation "
                            "(or tuned)")
    elif target in ("validation", "tuned"):
        raise UserError(f"target {target} needs a clean prompt/response JSONL file: pass --validation FILE")
    return overrides


def _finite_positive(value, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"{name} must be a finite number > 0, got {value}")


def cmd_score(args) -> int:
    import torch

    import alphatoken as at
    from ..data import load_model, pad_id_of, tokenize_records
    from ..report import render_report  # looked up per call: tests replace alphatoken.report.render_report
    from .shared import check_tracked_layers, clean_stale

    t0 = time.perf_counter()
    records, kind, out, cfg = _checked_score_args(args)
    device = resolve_device(args.device)
    show = progress_setting(args.quiet)
    clean_stale(out.parent if str(out.parent) else Path("."), names=[out.name])

    model, tokenizer = load_model(args.model, device=device)
    check_tracked_layers(model, cfg)
    if args.keep_eos:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise UserError(f"--keep-eos: the tokenizer of {args.model} has no eos token; pass "
                            "--always-keep-token-ids instead")
        cfg = cfg.replace(always_keep_token_ids=tuple(dict.fromkeys(cfg.always_keep_token_ids + (int(eos),))))
    max_length = max_length_for(model, tokenizer, args.max_length)
    examples = tokenize_records(records, tokenizer, kind, max_length=max_length, add_eos=not args.no_eos)
    pad_id = pad_id_of(tokenizer)
    validation = None
    if args.validation is not None:
        validation = validation_batches(args.validation, tokenizer, pad_id, max_length=max_length,
                                        batch_size=args.validation_batch_size, device=device,
                                        add_eos=not args.no_eos)
    retention = None
    if args.retention is not None:
        retention = retention_batch(args.retention, model, tokenizer, pad_id, max_length=max_length,
                                    tokens=retention_tokens(args.retention_tokens), device=device,
                                    add_eos=not args.no_eos)
    n_rows = len(examples) * (1 if kind == "sft" else 2)
    say(f"scoring {len(examples)} {'prompt/response' if kind == 'sft' else 'preference pair'} records "
        f"({n_rows} responses) from {args.data} with model {args.model} on {device}")

    fisher = None
    if args.fisher != "none":
        torch.manual_seed(args.seed)
        fisher = estimate_fisher(model, examples, kind, fisher=args.fisher, batch_size=args.batch_size,
                                 n_batches=args.fisher_batches, pad_id=pad_id, device=device, show=show, cfg=cfg)
    valuer = new_valuer(model, cfg, fisher, validation=validation, retention=retention)
    try:
        rows = _score_rows(valuer, examples, kind, pad_id, args.batch_size, device, args.beta, show)
    finally:
        valuer.close()
    stacked = _stack(rows)
    report_rows = response_rows(examples, kind)
    if args.select_within == "dataset":  # one cut over the whole file's values (always_keep_token_ids kept)
        stacked = _select_over_file(rows, report_rows, cfg)
    records_out = _value_records(examples, kind, rows, tokenizer)

    n_valued = int(stacked.response.sum())
    n_kept = int((stacked.mask & stacked.response).sum())
    summary = {
        "data": str(args.data), "kind": kind, "records": len(examples), "responses": n_rows,
        "model": str(args.model), "device": str(device), "fisher": args.fisher,
        "response_tokens_valued": n_valued, "kept": n_kept,
        "keep_ratio": _round(n_kept / n_valued) if n_valued else 0.0,
        "selection_over": args.select_within, "batch_size": args.batch_size, "max_length": max_length,
        "validation": None if args.validation is None else str(args.validation),
        "retention": args.retention,
        "batching": SELECT_WITHIN_NOTE,
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
        config=cfg.to_dict(), max_sequences=args.report_limit, always_keep_token_ids=cfg.always_keep_token_ids,
    )
    _write_outputs(out, records_out, html_text, summary, fisher if args.save_fisher else None)
    say(f"kept {n_kept} of {n_valued} response tokens ({n_kept / max(1, n_valued):.1%}); "
        f"wrote {out / 'values.jsonl'}, {out / 'report.html'}, {out / 'summary.json'}")
    return 0


def _checked_score_args(args):
    """(records, kind, out, cfg): everything checked before any work, so no model is loaded, no Fisher estimated
    and no file written on bad input."""
    from ..data import detect_kind, ensure_output_dir, read_jsonl

    records = read_jsonl(args.data)
    kind = detect_kind(records)
    out = Path(args.out)
    check_paths(args.data, args.model, args.validation, out, args.retention)
    ensure_output_dir(out)
    if args.validation is not None:
        detect_kind(read_jsonl(args.validation))
    cfg = valuation_config(check_validation_target(config_overrides(args), args.validation, retention=args.retention),
                           where="flags")
    for name, value, low in (("--batch-size", args.batch_size, 1), ("--report-limit", args.report_limit, 0),
                             ("--fisher-batches", args.fisher_batches, 1)):
        if value < low:
            raise UserError(f"{name} must be >= {low}, got {value}")
    if args.validation_batch_size is not None and args.validation_batch_size < 1:
        raise UserError(f"--validation-batch-size must be >= 1, got {args.validation_batch_size}")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max-length must be >= 2, got {args.max_length}")
    _finite_positive(args.beta, "--beta")
    check_retention(args.retention, retention_tokens(args.retention_tokens), cfg.target)
    return records, kind, out, cfg


def _select_over_file(rows, report_rows, cfg):
    """One cut over the values of the whole file (always_keep_token_ids kept), the library's
    (`alphatoken.offline.select_over_dataset`): each row's mask is replaced; returns the rows stacked again."""
    import torch

    from ..offline import select_over_dataset

    keeps = select_over_dataset([r["total"] for r in rows], [r["labels"] for r in report_rows], cfg)
    for r, keep in zip(rows, keeps):
        r["mask"] = torch.tensor(keep, dtype=torch.bool)
    return _stack(rows)


def _value_records(examples, kind: str, rows, tokenizer) -> list:
    """values.jsonl's records: one per input line, the per-token fields of its response(s)."""
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
    return records_out


def _write_outputs(out: Path, records_out, html_text: str, summary: dict, fisher) -> None:
    """Everything is computed; the outputs are written into a temporary folder beside OUT, which then replaces
    OUT in one step: OUT holds either the previous complete set or the new one, never a mix."""
    import shutil

    from ..data import atomic_output, swap_into_place, temp_dir_beside, write_json, write_jsonl

    try:
        tmp = temp_dir_beside(out)
    except OSError as err:
        raise RunError(f"{out}: cannot write the outputs ({err.strerror or err}); pass a writable --out") from None
    try:
        write_jsonl(tmp / "values.jsonl", records_out)
        with atomic_output(tmp / "report.html") as fh:
            fh.write(html_text)
        write_json(tmp / "summary.json", summary)
        if fisher is not None:
            fisher.save(str(tmp / "fisher.safetensors"))
        swap_into_place(tmp, out)
    except OSError as err:
        raise RunError(f"{out}: cannot write the outputs ({err.strerror or err}); nothing was changed there") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


SELECT_WITHIN_NOTE = (
    "select_within dataset makes one cut over the values of the whole file, so the cut itself does not depend on "
    "batching. The values can: with target batch each token is valued against its own scoring batch's mean "
    "gradient, normalize divides by a batch RMS, combine rank ranks within a batch, and the Fisher is estimated "
    "from the first fisher_batches batches of batch_size rows. With --validation FILE (one fixed direction: the "
    "whole file is one batch), --combine linear, normalize off and --fisher none, the values and masks do not "
    "depend on --batch-size (up to float rounding).")
