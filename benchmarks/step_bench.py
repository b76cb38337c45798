"""End to end: a plain SFT step against an AlphaToken `value_and_loss` step, as ratios measured side by side.

    python benchmarks/step_bench.py --cpu            # tiny Llama (4 layers, hidden 256), batch 8×128, fp32
    python benchmarks/step_bench.py                  # GPU: a Qwen2-0.5B-like LlamaConfig (494M params), bf16

A step is forward + backward, with **no optimizer step** by default (`--optimizer adamw` adds one to both
sides; it only dilutes the ratio, the same work on both): the plain step is `model(**batch).loss.backward()`,
the AlphaToken step is `valuer.value_and_loss(batch).backward()`; gradients are dropped (set to None) after
each. Configurations: paths direct/full × Fisher none/kfac/diag × all layers / the last k blocks.

Side by side: every round visits every configuration once (a rotating order). A visit builds the valuer
(untimed), warms a plain and an AlphaToken step, then times `inner` adjacent pairs (plain step, AlphaToken
step) and closes the valuer (its hooks removed), so that no two valuers ever coexist. One visit gives one
block ratio (Σ AlphaToken / Σ plain over its pairs); `ratio_vs_plain` is the median block ratio over rounds.
Pairing adjacent steps is what keeps the ratio honest on a machine whose load moves over seconds (the CPU
figures were taken on 2 cores shared with other jobs); a ratio of medians over a whole round would not be.
If a valuer leaves hooks registered between calls, the row says so (its plain steps then ran with them).

The valuers share one reference θ₀ taken before the weights are nudged by a small random step, so that the
drift terms of the stability value are not trivially zero (at θ = θ₀ they vanish).

"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import torch  # noqa: E402

import bench_common as C  # noqa: E402

IGNORE = -100


# ------------------------------------------------------------------------------------------------ models
def model_spec(device: torch.device, quick: bool) -> dict:
    """Model config, batch shape, dtype and the `last k` block count for this device/mode."""
    if device.type == "cpu" and quick:  # the smoke test's seconds-long run
        return dict(name="micro-llama-2x64", layers=2, hidden=64, inter=172, heads=4, kv=4, vocab=512,
                    tie=False, B=2, T=32, dtype=torch.float32, last_k=1, rounds=2, inner=1)
    if device.type == "cpu":  # the CPU step model of DESIGN §8.2: 4 layers, hidden 256, batch 8×128
        return dict(name="tiny-llama-4x256", layers=4, hidden=256, inter=688, heads=4, kv=4, vocab=8192,
                    tie=False, B=8, T=128, dtype=torch.float32, last_k=2, rounds=7, inner=2)
    # a Qwen2-0.5B-like Llama (hidden 896, 24 layers, GQA 14/2, vocab 151936, tied embeddings): 494M params
    return dict(name="qwen2-0.5b-like", layers=24, hidden=896, inter=4864, heads=14, kv=2, vocab=151936,
                tie=True, B=4 if quick else 8, T=512, dtype=torch.bfloat16, last_k=12,
                rounds=4 if quick else 6, inner=2)


def build_model(spec: dict, device: torch.device, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["inter"],
                      num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                      num_key_value_heads=spec["kv"], max_position_embeddings=max(512, spec["T"]),
                      tie_word_embeddings=spec["tie"], rope_theta=1e6 if spec["vocab"] > 100_000 else 10000.0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype=spec["dtype"])
    model.train()
    return model


def make_batch(spec: dict, device: torch.device, seed: int = 0) -> dict:
    """Random tokens; a prompt of T/4..T/2 tokens per row (labels -100), the rest is the response."""
    g = torch.Generator().manual_seed(seed)
    B, T = spec["B"], spec["T"]
    ids = torch.randint(4, spec["vocab"], (B, T), generator=g)
    labels = ids.clone()
    for b in range(B):
        p = int(torch.randint(T // 4, T // 2 + 1, (1,), generator=g))
        labels[b, :p] = IGNORE
    return {"input_ids": ids.to(device), "attention_mask": torch.ones(B, T, dtype=torch.long, device=device),
            "labels": labels.to(device)}


def count_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def cost_model_ratio(spec: dict, n_resp: int, paths: str, fisher: str, tracked, drift: bool = True) -> float:
    """The GEMM FLOPs of the work the engine does, as (plain step + AlphaToken's extra work) / plain step.

    plain = 3F, F = 2·tokens·(P_body + P_head) + attention 4·B·T²·h per layer. Per tracked layer (the head
    with P = h·V and n rows for U; the body with U over every position): U_l and one bilinear over the n
    response rows (DESIGN §8); "diag" one more pass (the Fisher norm); with `drift` (θ ≠ θ₀, any step after
    the first) "kfac" and "diag" one more bilinear each, the Fisher-weighted drift gᵀ(F ⊙ Δ)a, which §8 does
    not count. paths="full" adds the valuation backward, input gradients only: the head's over the response
    rows (it starts at the head input with g_head·W_head) and each tracked block's over every position.
    Element-wise work (softmax − onehot, squares) and Python overhead are left out: a floor, not a prediction.
    """
    h, I, L, V = spec["hidden"], spec["inter"], spec["layers"], spec["vocab"]
    kvd = h // spec["heads"] * spec["kv"]
    p_block = 2 * h * h + 2 * h * kvd + 3 * h * I
    tok = spec["B"] * spec["T"]
    attn = 4 * spec["B"] * spec["T"] ** 2 * h
    F = 2 * tok * (L * p_block + h * V) + L * attn
    passes = 1 + (fisher == "diag") + (drift and fisher != "none")  # bilinear passes over the response rows
    extra = 2 * n_resp * h * V * (1 + passes)  # U_head, then the head's passes
    if paths == "full":
        k = L if tracked == "all" else int(tracked)
        extra += 2 * n_resp * h * V + k * (2 * tok * p_block + 2 * attn)  # valuation backward, input grads only
        extra += k * (2 * tok * p_block + 2 * n_resp * p_block * passes)
    return (3 * F + extra) / (3 * F)


# ------------------------------------------------------------------------------------------------- bench
def step_configs(spec: dict, quick: bool, device: torch.device) -> List[dict]:
    k = spec["last_k"]
    if quick:
        combos = [("direct", "none", "all"), ("full", "kfac", "all"), ("full", "diag", k)]
    else:
        combos = [(p, f, t) for p in ("direct", "full") for f in ("none", "kfac", "diag") for t in ("all", k)]
    return [dict(paths=p, fisher=f, tracked=t, label=f"{p}/{f}/{'all' if t == 'all' else f'last{t}'}")
            for p, f, t in combos]


def _measure(model, batch, configs, spec, make_valuer, finish, plain_step, device, deadline, t_start, log):
    """Interleaved rounds: in each, every configuration (in a rotated order) as `inner` adjacent pairs of a plain
    step and its step. Returns (plain samples, {config: step samples}, {config: block ratios}, {config: error},
    {config: hook note}, rounds done)."""
    inner = spec["inner"]
    plain_samples: List[float] = []
    samples: Dict[str, List[float]] = {c["label"]: [] for c in configs}
    block_ratios: Dict[str, List[float]] = {c["label"]: [] for c in configs}
    errors: Dict[str, str] = {}
    hook_notes: Dict[str, str] = {}
    by_label = {c["label"]: c for c in configs}
    names = [c["label"] for c in configs]
    hooks0 = count_hooks(model)

    def timed(step) -> float:
        C.sync(device)
        t0 = time.perf_counter()
        step()
        C.sync(device)
        return (time.perf_counter() - t0) * 1e3

    done_rounds = 0
    for r in range(spec["rounds"]):
        if r >= 2 and time.monotonic() > deadline:
            log(f"[step_bench] time budget spent after {r} rounds")
            break
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            if name in errors:
                continue
            valuer = None
            try:
                valuer = make_valuer(by_label[name])
                if count_hooks(model) != hooks0:
                    hook_notes[name] = "valuer keeps hooks registered between calls: its plain steps ran with them"

                def alpha_step(v=valuer):
                    finish(v.value_and_loss(batch))

                plain_step()  # warm-up of both (and the hooks' first allocations)
                alpha_step()
                # adjacent pairs: a plain step, then this configuration's step, `inner` times; one ratio per block
                tp, ta = [], []
                for _ in range(inner):
                    tp.append(timed(plain_step))
                    ta.append(timed(alpha_step))
                plain_samples.extend(tp)
                samples[name].append(sum(ta) / len(ta))
                block_ratios[name].append(sum(ta) / sum(tp))
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                log(f"[step_bench] {name}: {errors[name]}")
            finally:
                if valuer is not None:
                    valuer.close()
                model.zero_grad(set_to_none=True)
        done_rounds = r + 1
        log(f"[step_bench] round {r + 1}: plain~{sorted(plain_samples)[len(plain_samples) // 2]:.1f} ms; " + ", ".join(
            f"{n} x{block_ratios[n][-1]:.2f}" for n in names if block_ratios[n]) + f" [{time.monotonic() - t_start:.0f}s]")
    return plain_samples, samples, block_ratios, errors, hook_notes, done_rounds


def _reference_then_step(model) -> dict:
    """θ₀, the reference every valuer anchors to; then a small random step so that Δ = θ − θ₀ ≠ 0."""
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for p in model.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))
    return reference


def _fishers(model, batch, configs, device):
    """({kind: Fisher} for the kinds the configurations use, with "none": None; {kind: estimate ms})."""
    import alphatoken as at

    fishers: Dict[str, object] = {"none": None}
    fisher_ms: Dict[str, float] = {}
    for kind in sorted({c["fisher"] for c in configs} - {"none"}):
        t0 = time.perf_counter()
        fishers[kind] = at.estimate_fisher(model, [batch], kind=kind)
        C.sync(device)
        fisher_ms[kind] = (time.perf_counter() - t0) * 1e3
        model.zero_grad(set_to_none=True)
    return fishers, fisher_ms


def _rows(env, spec, configs, provider, n_resp, desc, plain_samples, samples, block_ratios, errors, hook_notes,
          fisher_ms) -> List[dict]:
    """The stored rows: the plain step's, then one per configuration (its step time and ratio to plain)."""
    plain = C.summarize(plain_samples) if plain_samples else None
    base = dict(bench="step", dtype=str(spec["dtype"]).replace("torch.", ""), N=spec["B"] * spec["T"],
                d_in=spec["hidden"], d_out=spec["vocab"])
    rows = []
    if plain:
        rows.append(C.make_row(env, **base, op="plain SFT (fwd+bwd)", provider="plain", median_ms=plain[0],
                               q20_ms=plain[1], q80_ms=plain[2], ratio_vs_plain=1.0, note=desc))
    for c in configs:
        name = c["label"]
        s, br = samples[name], block_ratios[name]
        extra = ""
        if c["fisher"] in fisher_ms:
            extra = f"; fisher estimate {fisher_ms[c['fisher']]:.0f} ms (once)"
        if name in hook_notes:
            extra += "; " + hook_notes[name]
        if name in errors or not s or plain is None:
            rows.append(C.make_row(env, **base, op=name, provider=provider, status="error",
                                   note=errors.get(name, "no samples") + "; " + desc))
            continue
        med, q20, q80 = C.summarize(s)
        rmed, rq20, rq80 = C.summarize(br)
        rows.append(C.make_row(env, **base, op=name, provider=provider, median_ms=med, q20_ms=q20, q80_ms=q80,
                               ratio_vs_plain=rmed,
                               note=f"§8 floor x{cost_model_ratio(spec, n_resp, c['paths'], c['fisher'], c['tracked']):.2f}; "
                                    f"block ratios q20..q80 {rq20:.2f}..{rq80:.2f} (ratio of medians "
                                    f"{med / plain[0]:.2f}){extra}; {desc}"))
    return rows


def run(device: Optional[torch.device] = None, quick: bool = False, env: Optional[dict] = None,
        optimizer: Optional[str] = None, budget_s: float = 240.0,
        spec_overrides: Optional[dict] = None, rounds: Optional[int] = None, log=None) -> List[dict]:
    """Measure the plain step and every AlphaToken configuration side by side; return the rows."""
    log = log or (lambda *a: print(*a, file=sys.stderr, flush=True))
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mode = ("cpu" if device.type == "cpu" else "gpu") + ("-quick" if quick else "")
    env = env or C.environment(device, mode)
    spec = model_spec(device, quick)
    spec.update(spec_overrides or {})
    if rounds is not None:
        spec["rounds"] = rounds
    import alphatoken as at

    provider = "alphatoken"
    t_start = time.monotonic()
    model = build_model(spec, device)
    batch = make_batch(spec, device, seed=0)
    n_resp = int((batch["labels"][:, 1:] != IGNORE).sum())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5) if optimizer == "adamw" else None

    reference = _reference_then_step(model)
    configs = step_configs(spec, quick, device)
    fishers, fisher_ms = _fishers(model, batch, configs, device)

    def make_valuer(c):
        cfg = at.AlphaTokenConfig(paths=c["paths"], tracked_layers=c["tracked"], keep_ratio=0.6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fisher=None's stability warning
            return at.AlphaToken(model, cfg, fisher=fishers[c["fisher"]], reference=reference)

    def finish(loss):
        loss.backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)

    def plain_step():
        finish(model(**batch).loss)

    inner = spec["inner"]
    log(f"[step_bench] {spec['name']} ({n_params(model) / 1e6:.1f}M params, {spec['dtype']}), batch "
        f"{spec['B']}x{spec['T']} ({n_resp} response tokens), {provider}, {len(configs)} configs, "
        f"{spec['rounds']} rounds x {inner} pairs")
    plain_samples, samples, block_ratios, errors, hook_notes, done_rounds = _measure(
        model, batch, configs, spec, make_valuer, finish, plain_step, device, t_start + budget_s, t_start, log)
    desc = (f"{spec['name']} {n_params(model) / 1e6:.1f}M params, batch {spec['B']}x{spec['T']}, "
            f"{n_resp} resp tokens, {'adamw' if opt else 'no optimizer step'}, {done_rounds} rounds x {inner} pairs")
    rows = _rows(env, spec, configs, provider, n_resp, desc, plain_samples, samples, block_ratios, errors,
                 hook_notes, fisher_ms)
    if device.type == "cuda":  # the model goes with this frame
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--optimizer", choices=("none", "adamw"), default="none")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None, help="override the model's vocabulary size")
    p.add_argument("--budget-s", type=float, default=600.0)
    p.add_argument("--csv", default=None)
    p.add_argument("--threads", type=int, default=1, help="CPU torch threads (see gpu_bench --threads)")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads))
    mode = ("cpu" if device.type == "cpu" else "gpu") + ("-quick" if args.quick else "")
    env = C.environment(device, mode + ("" if args.vocab is None else f"-vocab{args.vocab}"))
    rows = run(device=device, quick=args.quick, env=env,
               optimizer=None if args.optimizer == "none" else args.optimizer, budget_s=args.budget_s,
               spec_overrides={"vocab": args.vocab} if args.vocab else None, rounds=args.rounds)
    csv_path = args.csv or str(C.RESULTS_DIR / f"step_{mode}_{time.strftime('%Y-%m-%d')}.csv")
    C.write_csv(rows, Path(csv_path))
    from bench_table import format_table

    print(format_table(rows))
    print(f"rows written to {csv_path}")
    return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
