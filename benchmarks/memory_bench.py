"""Peak memory of one training step: plain transformers, a plain chunked-loss step, Liger FLCE, AlphaToken.

    python benchmarks/memory_bench.py --cpu --vocab 32768 131072 --tokens 2048        # the CPU subset
    python benchmarks/memory_bench.py --vocab 32768 131072 262144 --tokens 2048 8192  # GPU: the full grid

A step is forward + backward of one batch (B = 1, T = tokens; a prompt of T/4..T/2 tokens, the rest response),
no optimizer step, on a small Llama with a big vocabulary (2 layers, hidden 256, untied head, fp32 on CPU,
bf16 on GPU), after one warm-up step (AlphaToken's first step checks its fused head against the model's own
logits). Providers:

* `plain`      — `model(**batch, labels=labels).loss.backward()`: transformers' own loss over (B, T, V) logits;
* `chunked`    — the body forward, then the NLL of the response rows by chunks of 512 rows, each chunk's head
                 and cross-entropy under `torch.utils.checkpoint` (its logits recomputed in the backward);
* `liger`      — `LigerFusedLinearCrossEntropyLoss` on the response rows (needs CUDA: on a CPU the row says
                 skipped; Liger-Kernel's Triton kernels find "0 active drivers" there);
* `alphatoken` — `valuer.value_and_loss(batch).backward()` in the modes direct/none, full/none, full/kfac,
                 full/diag (all layers, batch target), with the drift live (θ₀ taken, then the weights nudged).

Each configuration runs in a fresh subprocess. CPU: peak RSS of the step above the RSS just before it
(`/proc/self/clear_refs` resets the high-water mark, glibc's mmap threshold is pinned so that freed blocks go
back to the system, `malloc_trim` before the step). GPU: `torch.cuda.max_memory_allocated` above the memory
allocated before the step. CSV rows in the shared schema (bench="memory", peak_mib = the step's extra peak,
ratio_vs_plain = peak / the plain step's peak; the note has the ratio to the chunked step and the baseline).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import torch  # noqa: E402

import bench_common as C  # noqa: E402
import step_bench as SB  # noqa: E402

MODES = ("direct/none", "full/none", "full/kfac", "full/diag")
CHUNK = 512


def spec_for(device: torch.device, vocab: int, tokens: int) -> dict:
    return dict(name=f"llama-2x256-V{vocab}", layers=2, hidden=256, inter=688, heads=4, kv=4, vocab=vocab,
                tie=False, B=1, T=tokens, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)


# ----------------------------------------------------------------------------------------- one measurement
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def _fisher(valuer, kind: str, seed: int = 0):
    import alphatoken as at

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in valuer.layers:
        d_out, d_in = layer.shape
        if kind == "diag":
            tensors[layer.name] = torch.rand(d_out, d_in, generator=g) + 0.1
        else:
            tensors[layer.name] = (torch.rand(d_out, generator=g) + 0.1, torch.rand(d_in, generator=g) + 0.1)
    return at.Fisher(kind, tensors)


def _step_fn(provider: str, mode: str, model, batch, device):
    """The step to measure (a closure); builds the valuer (drift live) for AlphaToken."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if provider == "plain":
        return lambda: model(**inputs, labels=labels).loss.backward()
    resp = labels[:, 1:] != -100
    rows = resp.reshape(-1).nonzero().squeeze(1)
    targets = labels[:, 1:].reshape(-1).index_select(0, rows)
    head = model.get_output_embeddings()
    if provider == "chunked":
        from torch.utils.checkpoint import checkpoint

        def piece(h, y):
            return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")

        def step():
            hidden = model.model(**inputs).last_hidden_state[:, :-1].reshape(-1, head.in_features)
            h = hidden.index_select(0, rows)
            total = sum(checkpoint(piece, h[s:s + CHUNK], targets[s:s + CHUNK], use_reentrant=False)
                        for s in range(0, h.shape[0], CHUNK))
            (total / h.shape[0]).backward()
        return step
    if provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        flce = LigerFusedLinearCrossEntropyLoss()

        def step():
            hidden = model.model(**inputs).last_hidden_state[:, :-1].reshape(-1, head.in_features)
            flce(head.weight, hidden.index_select(0, rows), targets).backward()
        return step
    import alphatoken as at

    paths, fisher = mode.split("/")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = at.AlphaToken(model, at.AlphaTokenConfig(paths=paths), fisher=None)
        fish = None if fisher == "none" else _fisher(probe, fisher)
        probe.close()
        valuer = at.AlphaToken(model, at.AlphaTokenConfig(paths=paths), fisher=fish)
    with torch.no_grad():  # θ ≠ θ₀: the drift terms are live
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(1e-3 * torch.randn(p.shape, generator=g).to(p))
    return lambda: valuer.value_and_loss(batch).backward()


def measure_one(provider: str, mode: str, vocab: int, tokens: int, device: torch.device) -> dict:
    spec = spec_for(device, vocab, tokens)
    model = SB.build_model(spec, device)
    batch = SB.make_batch(spec, device)
    step = _step_fn(provider, mode, model, batch, device)

    def clear():
        for p in model.parameters():
            p.grad = None

    step()  # warm-up (allocator pools, AlphaToken's first-step check)
    clear()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        _trim()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        step()
        ms = 1e3 * (time.perf_counter() - t0)
        peak = _rss_kib("VmHWM") * 1024 - base
    return {"peak_mib": peak / 2**20, "base_mib": base / 2**20, "ms": ms,
            "n_resp": int((batch["labels"][:, 1:] != -100).sum())}


# --------------------------------------------------------------------------------------------- the grid
def configurations(only=None):
    """(provider, mode) pairs; `only`: labels to keep ("plain", "chunked", "liger", "alphatoken:full/kfac")."""
    every = [("plain", ""), ("chunked", ""), ("liger", "")] + [("alphatoken", mode) for mode in MODES]
    if only:
        unknown = set(only) - {p + (f":{m}" if m else "") for p, m in every}
        if unknown:
            raise ValueError(f"unknown providers {sorted(unknown)}; choose among plain, chunked, liger, "
                             f"{', '.join('alphatoken:' + m for m in MODES)}")
    return [(p, m) for p, m in every if not only or p + (f":{m}" if m else "") in only]


def liger_reason(device: torch.device):
    if device.type != "cuda":
        return "Liger FLCE needs a GPU (its Triton kernels find 0 active drivers on a CPU)"
    try:
        import liger_kernel  # noqa: F401
    except Exception as err:  # pragma: no cover - depends on the install
        return f"liger-kernel not importable: {err}"
    return None


def run(device: torch.device, vocabs, token_counts, env: dict, timeout_s: float, log=print, only=None) -> list:
    rows = []
    for vocab in vocabs:
        for tokens in token_counts:
            found = {}
            for provider, mode in configurations(only):
                label = provider + (f" {mode}" if mode else "")
                common = dict(bench="memory", op=f"V{vocab}-T{tokens}", provider=provider, dtype=str(
                    spec_for(device, vocab, tokens)["dtype"]).replace("torch.", ""), N=tokens, V=vocab,
                    d_in=256, d_out=vocab)
                reason = liger_reason(device) if provider == "liger" else None
                if reason:
                    rows.append(C.make_row(env, **common, status="skipped", note=reason))
                    log(f"{common['op']:>14} {label:<22} skipped: {reason}")
                    continue
                cmd = [sys.executable, "-P", __file__, "--one", json.dumps(
                    dict(provider=provider, mode=mode, vocab=vocab, tokens=tokens, device=device.type))]
                envvars = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", ALPHATOKEN_KERNELS=os.environ.get(
                    "ALPHATOKEN_KERNELS", "auto"))
                envvars.pop("TRITON_INTERPRET", None)
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=envvars)
                    res = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
                    err = None if res else (out.stderr.strip().splitlines() or ["?"])[-1]
                except subprocess.TimeoutExpired:
                    res, err = None, f"timed out after {timeout_s:.0f} s"
                if res is None:
                    rows.append(C.make_row(env, **common, status="error", note=f"{mode} {err}".strip()))
                    log(f"{common['op']:>14} {label:<22} error: {err}")
                    continue
                found[label] = res["peak_mib"]
                plain, chunked = found.get("plain"), found.get("chunked")
                note = f"{mode + '; ' if mode else ''}baseline {res['base_mib']:.0f} MiB; {res['n_resp']} response tokens"
                if chunked:
                    note += f"; {res['peak_mib'] / chunked:.2f}x the chunked step"
                rows.append(C.make_row(env, **common, peak_mib=round(res["peak_mib"], 1), median_ms=round(res["ms"], 1),
                                       ratio_vs_plain=round(res["peak_mib"] / plain, 3) if plain else "", note=note))
                log(f"{common['op']:>14} {label:<22} peak {res['peak_mib']:8.0f} MiB"
                    + (f"  {res['peak_mib'] / plain:5.2f}x plain" if plain else "")
                    + (f"  {res['peak_mib'] / chunked:5.2f}x chunked" if chunked else "")
                    + f"  step {res['ms'] / 1e3:6.1f} s")
    return rows


def plot(rows, out: Path) -> Path:
    """Bars of the step's extra peak per provider, one group per (vocab, tokens) case, from the stored rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["bench"] == "memory"]
    cases = list(dict.fromkeys(r["op"] for r in ok))
    labels = list(dict.fromkeys(f"{r['provider']} {r['note'].split(';')[0] if r['provider'] == 'alphatoken' else ''}".strip()
                                for r in ok))
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(cases) * max(1, len(labels)) / 3, 4))
    width = 0.8 / max(1, len(labels))
    for j, label in enumerate(labels):
        xs, ys = [], []
        for i, case in enumerate(cases):
            for r in ok:
                name = f"{r['provider']} {r['note'].split(';')[0] if r['provider'] == 'alphatoken' else ''}".strip()
                if r["op"] == case and name == label:
                    xs.append(i + j * width)
                    ys.append(float(r["peak_mib"]))
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases)
    ax.set_ylabel("extra peak of one step (MiB)")
    first = ok[0] if ok else {}
    ax.set_title(f"{first.get('device', '')} | {first.get('date', '')} | torch {first.get('torch', '')} | "
                 f"alphatoken {first.get('git_rev', '')}", fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048])
    p.add_argument("--timeout-s", type=float, default=600.0, help="per configuration")
    p.add_argument("--providers", nargs="+", default=None,
                   help="a subset: plain chunked liger alphatoken:direct/none alphatoken:full/kfac ...")
    p.add_argument("--csv", default=None)
    p.add_argument("--plot", action="store_true", help="also write a .png beside the CSV (needs matplotlib)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:  # the child: one measurement, printed as JSON
        cfg = json.loads(args.one)
        torch.set_num_threads(1)
        print(json.dumps(measure_one(cfg["provider"], cfg["mode"], cfg["vocab"], cfg["tokens"],
                                     torch.device(cfg["device"]))))
        return 0
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    mode = "cpu" if device.type == "cpu" else "gpu"
    env = C.environment(device, f"memory-{mode}")
    rows = run(device, args.vocab, args.tokens, env, args.timeout_s, only=args.providers)
    csv_path = Path(args.csv or C.RESULTS_DIR / f"memory_{mode}_{time.strftime('%Y-%m-%d')}.csv")
    C.write_csv(rows, csv_path)
    print(f"rows written to {csv_path}")
    if args.plot:
        print(f"plot written to {plot(rows, csv_path.with_suffix('.png'))}")
    return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
