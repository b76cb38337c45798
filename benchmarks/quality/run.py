"""Quality experiment (DESIGN §13): AlphaToken vs baselines on target accuracy and forgetting, on the toy world.

The built-in tiny Llama (pre-trained on add / copy / reverse) is fine-tuned on the new "sort" task whose training
responses carry low-value tokens (boilerplate filler, a systematic wrong span, random corruptions). Every method
keeps the same share of response tokens (except `full`). Measured on clean held-out data: target exact match,
exact match on each retention task before/after (the drop is forgetting), tokens trained, wall time.

    python benchmarks/quality/run.py --keep-eos    # round 2: all methods, seeds 0 1 2, AdamW 4e-4, batch 64, 200 steps
    python benchmarks/quality/run.py --methods full,random,at_full_val_kfac --seeds 0 --steps 20 --out /tmp/q  # quick look

Rows are appended to <out>/results.csv as each (method, seed) finishes (rerunning skips rows already there
unless --fresh), then <out>/table.md (mean ± std over seeds) and <out>/quality.png (from the CSV) are written.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from alphatoken.toy.experiment import LIBRARY_DEFAULT, MethodSpec, run_one
from alphatoken.toy.tasks import RETENTION_TASKS, TargetNoise

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from detect import git_revision  # noqa: E402  (the checkout's revision, ALPHATOKEN_GIT_REV overrides it)

GIT_REVISION = git_revision()

# name -> spec; AlphaToken configs extend alphatoken.toy.experiment.ALPHATOKEN_DEFAULT (normalize=True, γ=1, λ=1).
METHODS = {
    "full": MethodSpec("full", kind="full"),
    "random": MethodSpec("random", kind="scorer", scorer="random"),
    "rho1": MethodSpec("rho1", kind="scorer", scorer="excess_loss"),
    "loss_low": MethodSpec("loss_low", kind="scorer", scorer="loss_low"),
    "loss_high": MethodSpec("loss_high", kind="scorer", scorer="loss_high"),
    "entropy": MethodSpec("entropy", kind="scorer", scorer="entropy"),
    "at_adapt": MethodSpec("at_adapt", config=dict(stability_weight=0.0), fisher=None),
    "at_stab_kfac": MethodSpec("at_stab_kfac", config=dict(target="none"), fisher="kfac"),
    "at_full_batch_kfac": MethodSpec("at_full_batch_kfac", config=dict(target="batch"), fisher="kfac"),
    "at_full_batch_diag": MethodSpec("at_full_batch_diag", config=dict(target="batch"), fisher="diag"),
    "at_full_val_kfac": MethodSpec("at_full_val_kfac", config=dict(target="validation", refresh=5), fisher="kfac"),
    "at_full_val_diag": MethodSpec("at_full_val_diag", config=dict(target="validation", refresh=5), fisher="diag"),
    # the validation rule chosen by the token-detection benchmark in round 4 (DESIGN §3.5): the defaults of rounds 4-7
    "at_default": MethodSpec("at_default", config=dict(LIBRARY_DEFAULT, target="validation", refresh=5),
                             fisher="kfac"),
}
# the library's defaults since round 8 (target="auto" with the clean validation batch: the tuned recipe)
METHODS["at_auto"] = MethodSpec("at_auto", config=dict(LIBRARY_DEFAULT), fisher="kfac")
# Variants explored in RESULTS.md (run with --methods <name>); not part of "all".
VARIANTS = {
    "grad_norm_low": MethodSpec("grad_norm_low", kind="scorer", scorer="grad_norm_low"),  # GraNd per token (round 19)
    "at_adapt_val": MethodSpec("at_adapt_val", config=dict(stability_weight=0.0, target="validation", refresh=5), fisher=None),
    "at_stab_diag": MethodSpec("at_stab_diag", config=dict(target="none"), fisher="diag"),
    "at_adapt_direct": MethodSpec("at_adapt_direct", config=dict(stability_weight=0.0, paths="direct"), fisher=None),
    "at_adapt_val_direct": MethodSpec("at_adapt_val_direct", config=dict(stability_weight=0.0, paths="direct",
                                                                          target="validation", refresh=5), fisher=None),
    "at_full_val_kfac_raw": MethodSpec("at_full_val_kfac_raw", config=dict(target="validation", refresh=5, normalize=False),
                                       fisher="kfac"),
    "at_full_batch_kfac_raw": MethodSpec("at_full_batch_kfac_raw", config=dict(target="batch", normalize=False),
                                         fisher="kfac"),
}

TABLE_COLUMNS = [("target_exact_match", "target EM"), *[(f"{t}_drop", f"{t} drop") for t in RETENTION_TASKS],
                 ("mean_drop", "mean drop"), ("noise_dropped_share", "noise dropped"),
                 ("clean_dropped_share", "clean dropped"), ("tokens_trained", "tokens trained"),
                 ("wall_time", "wall time (s)")]


def parse_set(items):
    """--set key=value pairs (JSON values where they parse) applied to every AlphaToken method's config."""
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def resolve_methods(arg: str, overrides: dict, suffix: str, keep_ids: tuple = ()):
    names = list(METHODS) if arg == "all" else [m.strip() for m in arg.split(",") if m.strip()]
    specs = []
    for name in names:
        table = {**METHODS, **VARIANTS}
        if name not in table:
            raise SystemExit(f"unknown method {name!r}; choose from {sorted(table)} or 'all'")
        spec = table[name]
        if spec.kind == "alphatoken" and (overrides or suffix):
            spec = MethodSpec(spec.name + suffix, kind=spec.kind, scorer=spec.scorer,
                              config={**spec.config, **overrides}, fisher=spec.fisher)
        elif suffix and spec.kind != "alphatoken":
            spec = MethodSpec(spec.name + suffix, kind=spec.kind, scorer=spec.scorer, config=spec.config,
                              fisher=spec.fisher)
        if keep_ids and spec.kind != "full":  # the same rule for every masking method
            spec = MethodSpec(spec.name, kind=spec.kind, scorer=spec.scorer,
                              config={**spec.config, "always_keep_token_ids": list(keep_ids)}, fisher=spec.fisher)
        specs.append(spec)
    return specs


def read_rows(path: Path):
    if not path.exists():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                pass
    return rows


def append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    if not new:  # keep the header stable; new keys go last
        with path.open() as f:
            header = next(csv.reader(f))
        missing = [k for k in row if k not in header]
        if missing:
            old = read_rows(path)
            header += missing
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=header)
                writer.writeheader()
                writer.writerows(old)
    else:
        header = list(row)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _fmt(key, mean, std):
    if key in ("tokens_trained",):
        return f"{mean:.0f} ± {std:.0f}"
    if key == "wall_time":
        return f"{mean:.1f} ± {std:.1f}"
    return f"{mean:.3f} ± {std:.3f}"


def table(rows, methods=None) -> str:
    """Markdown table, mean ± std over seeds, one line per method (in first-seen order)."""
    order = []
    for r in rows:
        if r["method"] not in order:
            order.append(r["method"])
    if methods:
        order = [m for m in order if m in methods]
    head = "| method | seeds | " + " | ".join(label for _, label in TABLE_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    for name in order:
        sel = [r for r in rows if r["method"] == name]
        cells = []
        for key, _ in TABLE_COLUMNS:
            vals = [float(r[key]) for r in sel if r.get(key) not in (None, "")]
            mean = statistics.mean(vals) if vals else float("nan")
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(_fmt(key, mean, std))
        lines.append(f"| {name} | {len(sel)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(csv_path: Path, png_path: Path) -> bool:
    """Target EM vs mean retention drop (mean ± std over seeds), one point per method; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install 'alphatoken[plot]'); skipping the plot", file=sys.stderr)
        return False
    rows = read_rows(csv_path)
    names = []
    for r in rows:
        if r["method"] not in names:
            names.append(r["method"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab20").colors
    for i, name in enumerate(names):
        sel = [r for r in rows if r["method"] == name]
        x = [float(r["mean_drop"]) for r in sel]
        y = [float(r["target_exact_match"]) for r in sel]
        sx = statistics.stdev(x) if len(x) > 1 else 0.0
        sy = statistics.stdev(y) if len(y) > 1 else 0.0
        marker = "s" if name.startswith("full") else ("o" if name.startswith("at_") else "^")
        color = "0.35" if name.startswith("full_lr") else colors[i % len(colors)]
        axes[0].errorbar(statistics.mean(x), statistics.mean(y), xerr=sx, yerr=sy, fmt=marker, capsize=3,
                         label=name, color=color)
    frontier = []  # full-token SFT at several learning rates ("full", "full_lr..."): the trade-off without masking
    for name in names:
        if name == "full" or name.startswith("full_lr"):
            sel = [r for r in rows if r["method"] == name]
            frontier.append((statistics.mean(float(r["mean_drop"]) for r in sel),
                             statistics.mean(float(r["target_exact_match"]) for r in sel)))
    if len(frontier) > 1:
        frontier.sort()
        axes[0].plot([x for x, _ in frontier], [y for _, y in frontier], "k--", lw=1, alpha=0.6,
                     label="full SFT, lr sweep")
    axes[0].set_xlabel("mean retention drop (forgetting, lower is better)")
    axes[0].set_ylabel("target exact match on clean held-out (higher is better)")
    axes[0].set_title("target accuracy vs forgetting (mean ± std over seeds)")
    axes[0].legend(fontsize=7, loc="best")
    width = 0.8 / len(RETENTION_TASKS)
    for i, task in enumerate(RETENTION_TASKS):
        means = [statistics.mean(float(r[f"{task}_drop"]) for r in rows if r["method"] == n) for n in names]
        axes[1].bar([j + i * width for j in range(len(names))], means, width=width, label=task)
    axes[1].set_xticks([j + width for j in range(len(names))])
    axes[1].set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    axes[1].set_ylabel("accuracy drop (before - after)")
    axes[1].set_title("forgetting per retention task")
    axes[1].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    """The command line of one quality run: seeds, steps, methods, optimizer and the data's size and noise."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--keep-ratio", type=float, default=0.6)
    parser.add_argument("--methods", default="all", help=f"'all' or a comma list of {list(METHODS) + list(VARIANTS)}")
    parser.add_argument("--out", default=str(HERE / "out_r2" / "main"))
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--optimizer", choices=["adamw", "sgd", "sgdm"], default="adamw",
                        help="sgdm: SGD with momentum 0.9")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip; 0 turns it off")
    parser.add_argument("--keep-eos", action="store_true",
                        help="every masking method always keeps <eos> (always_keep_token_ids=(eos_id,))")
    parser.add_argument("--model-dir", default=None,
                        help="another build of the toy model (default: the built-in one)")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval-retention", type=int, default=200)
    parser.add_argument("--n-eval-target", type=int, default=300)
    parser.add_argument("--noise", default=None, help="JSON of TargetNoise fields, e.g. '{\"filler_rate\": 0.3}'")
    parser.add_argument("--set", nargs="*", default=[], help="AlphaToken config overrides key=value")
    parser.add_argument("--suffix", default="", help="appended to method names (to tag a variant)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="discard <out>/results.csv first")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--merge", nargs="*", default=[],
                        help="other output dirs whose results.csv rows are merged into <out>/results.csv first "
                             "(for runs split over processes)")
    return parser


def _key(r) -> tuple:
    """A results.csv row's identity: (method, seed, steps, keep_ratio)."""
    return r["method"], int(r["seed"]), int(r["steps"]), float(r["keep_ratio"])


def _prepare_results(out: Path, fresh: bool, merge) -> Path:
    """<out>/results.csv, emptied when `fresh`, with the rows of the `merge` folders' results it lacks appended."""
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    if fresh and csv_path.exists():
        csv_path.unlink()
    for other in merge:
        have = {_key(r) for r in read_rows(csv_path)}
        for r in read_rows(Path(other) / "results.csv"):
            if _key(r) not in have:
                append_row(csv_path, r)
    return csv_path


def _run_missing(args, specs, csv_path: Path, noise) -> None:
    """Train every (method, seed) not yet in results.csv, appending each row as it finishes."""
    grad_clip = args.grad_clip if args.grad_clip > 0 else None
    done = {_key(r) for r in read_rows(csv_path)}
    env = {"torch": torch.__version__, "device": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads()}
    for spec in specs:
        for seed in args.seeds:
            if (spec.name, seed, args.steps, args.keep_ratio) in done:
                continue
            t0 = time.perf_counter()
            row = run_one(spec, seed=seed, keep_ratio=args.keep_ratio, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, n_train=args.n_train, noise=noise,
                          n_eval_retention=args.n_eval_retention, n_eval_target=args.n_eval_target, progress=args.progress,
                          optimizer=args.optimizer, grad_clip=grad_clip)
            row.update(lr=args.lr, batch_size=args.batch_size, optimizer=args.optimizer, grad_clip=args.grad_clip,
                       model_dir=args.model_dir or "builtin", config=json.dumps(spec.config, sort_keys=True),
                       fisher=spec.fisher if spec.kind == "alphatoken" else "",
                       noise=args.noise or "default", git=GIT_REVISION, **env)
            append_row(csv_path, row)
            print(f"{spec.name:>24} seed {seed}: target {row['target_exact_match']:.3f} drop "
                  f"{row['mean_drop']:+.3f} (add {row['add_drop']:+.3f}) noise-dropped "
                  f"{row['noise_dropped_share']:.2f} keep {row['keep_ratio_actual']:.2f} "
                  f"train {row['wall_time']:.1f}s total {time.perf_counter() - t0:.1f}s", flush=True)


def _write_summary(args, specs, csv_path: Path, out: Path) -> dict:
    """The table of this run's setting (table.md, printed) and the plot; what `main` returns."""
    rows = [r for r in read_rows(csv_path) if int(r["steps"]) == args.steps
            and abs(float(r["keep_ratio"]) - args.keep_ratio) < 1e-9 and (r["method"] in {s.name for s in specs}
                                                                            or args.methods == "all")]
    md = table(rows)
    header = (f"steps={args.steps} batch_size={args.batch_size} lr={args.lr} keep_ratio={args.keep_ratio} "
              f"seeds={args.seeds} n_train={args.n_train} noise={args.noise or 'default'}\n\n")
    (out / "table.md").write_text(header + md)
    print(header + md)
    plotted = plot(csv_path, out / "quality.png")
    return {"csv": csv_path, "table": out / "table.md", "plot": out / "quality.png" if plotted else None,
            "rows": rows}


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    out = Path(args.out)
    csv_path = _prepare_results(out, args.fresh, args.merge)
    if args.model_dir:
        os.environ["ALPHATOKEN_TOY_MODEL_DIR"] = str(Path(args.model_dir).resolve())
    noise = TargetNoise(**json.loads(args.noise)) if args.noise else None
    keep_ids = ()
    if args.keep_eos:
        from alphatoken.toy.tokenizer import build_tokenizer

        keep_ids = (build_tokenizer().eos_token_id,)
    specs = resolve_methods(args.methods, parse_set(args.set), args.suffix, keep_ids)
    _run_missing(args, specs, csv_path, noise)
    return _write_summary(args, specs, csv_path, out)


if __name__ == "__main__":
    main()
