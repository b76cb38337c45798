"""`alphatoken score DATA.jsonl`: value every response token of a dataset at the model's weights and write
OUT/values.jsonl (values and keep masks per token), OUT/report.html and OUT/summary.json."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .shared import (config_overrides, estimate_fisher, max_length_for, new_valuer, progress_setting,
                     reference_logprobs, resolve_device, response_rows, save_fisher, say, valuation_config)


def _round(x: float) -> float:
    return float(f"{x:.7g}") if math.isfinite(x) else x


def _score_rows(valuer, examples: list[dict], kind: str, pad_id: int, batch_size: int, device, beta: float,
                show: Optional[bool]) -> list[dict]:
    """Per-row value tensors (1-D, length of the row) in report order (DPO: chosen then rejected per pair)."""
    from ..data import chunks, collate, collate_dpo
    from ..progress import progress

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
            from ..dpo import dpo_token_weights
            from ..losses import response_mask

            batch = collate_dpo(group, pad_id, device=device)
            ref = reference_logprobs(valuer.model, batch)
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


def cmd_score(args) -> int:
    import torch

    import alphatoken as at
    from ..data import (atomic_output, detect_kind, ensure_output_dir, load_model, pad_id_of, read_jsonl,
                        tokenize_records, write_json, write_jsonl)
    from ..report import render_report  # looked up per call: tests replace alphatoken.report.render_report
    from ..select import select_local

    t0 = time.perf_counter()
    records = read_jsonl(args.data)
    kind = detect_kind(records)
    out = ensure_output_dir(args.out)
    cfg = valuation_config(config_overrides(args))
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.report_limit < 0:
        raise UserError(f"--report-limit must be >= 0, got {args.report_limit}")
    device = resolve_device(args.device)
    show = progress_setting(args.quiet)
    model, tokenizer = load_model(args.model, device=device)
    max_length = max_length_for(model, tokenizer, args.max_length)
    examples = tokenize_records(records, tokenizer, kind, max_length=max_length, add_eos=not args.no_eos)
    pad_id = pad_id_of(tokenizer)
    n_rows = len(examples) * (1 if kind == "sft" else 2)
    say(f"scoring {len(examples)} {'prompt/response' if kind == 'sft' else 'preference pair'} records "
        f"({n_rows} responses) from {args.data} with model {args.model} on {device}")

    fisher = None
    if args.fisher != "none":
        torch.manual_seed(args.seed)
        fisher = estimate_fisher(model, examples, kind, fisher=args.fisher, batch_size=args.batch_size,
                                 n_batches=args.fisher_batches, pad_id=pad_id, device=device, show=show)
    valuer = new_valuer(model, cfg, fisher)
    try:
        rows = _score_rows(valuer, examples, kind, pad_id, args.batch_size, device, args.beta, show)
    finally:
        valuer.close()
    stacked = _stack(rows)
    if args.select_within == "dataset":  # one selection over the whole file: masks do not depend on batching
        stacked.mask = select_local(stacked.total, stacked.response, cfg)
        for i, r in enumerate(rows):
            r["mask"] = stacked.mask[i, : r["mask"].numel()].clone()

    report_rows = response_rows(examples, kind)
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
        save_fisher(fisher, out / "fisher.safetensors")
    say(f"kept {n_kept} of {n_valued} response tokens ({n_kept / max(1, n_valued):.1%}); "
        f"wrote {out / 'values.jsonl'}, {out / 'report.html'}, {out / 'summary.json'}")
    return 0

