"""`alphatoken demo`: fine-tune the built-in tiny Llama twice (every token, AlphaToken), print the comparison and
write OUT/report.html and OUT/demo.json."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ..batch import IGNORE_INDEX
from ..errors import UserError
from .shared import say


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
        start = next((i for i, x in enumerate(lab) if x != IGNORE_INDEX), n)
        row = {"index": b, "input_ids": ids[b, :n].tolist(), "labels": lab,
               "prompt": tokenizer.decode(ids[b, :start].tolist(), skip_special_tokens=True)}
        if noise is not None:
            row["flags"] = noise[b, :n].tolist()
        rows.append(row)
    return rows, example["values"]


def cmd_demo(args) -> int:
    out = Path(args.out)
    from ..data import ensure_output_dir, write_json
    from ..report import write_report

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if not 0.0 < args.keep_ratio <= 1.0:
        raise UserError(f"--keep-ratio must be in (0, 1], got {args.keep_ratio}")
    ensure_output_dir(out)
    from .. import toy

    steps = args.steps if args.steps is not None else toy.DEFAULTS["steps"]
    show = not args.quiet
    say(f"AlphaToken demo: fine-tuning the built-in tiny Llama on the noisy '{toy.TARGET_TASK}' task, "
        f"{steps} steps, once with every token and once with AlphaToken (keep {args.keep_ratio:.0%}).")
    t0 = time.perf_counter()
    from .config_flags import config_from_args
    from .shared import valuation_config

    config = config_from_args(args)
    valuation_config({**toy.ALPHATOKEN_DEFAULT, **config, "keep_ratio": args.keep_ratio}, where="flags")  # check
    kwargs = dict(steps=steps, seeds=(args.seed,), keep_ratio=args.keep_ratio, progress=show, config=config)
    if args.fisher is not None:
        kwargs["fisher"] = None if args.fisher == "none" else args.fisher
    result = toy.compare(**kwargs)
    wall = time.perf_counter() - t0
    table, rows = _demo_table(result)
    say("")
    say(table)
    say("")
    say(f"total wall time {wall:.0f} s")

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
                 flag_label="known noise",
                 always_keep_token_ids=(settings.get("config") or {}).get("always_keep_token_ids", ()))
    write_json(out / "demo.json", _jsonable({k: v for k, v in result.items() if k != "example"}
                                            | {"wall_time": wall}))
    say(f"report: {report}")
    say(f"numbers: {out / 'demo.json'}")
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
