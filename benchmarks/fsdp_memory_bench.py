"""Per-rank memory of AlphaToken's state under FSDP2 at several world sizes, on CPU (gloo), DESIGN §16.

    python benchmarks/fsdp_memory_bench.py --worlds 1 2 4                      # the figures in RESULTS.md
    python benchmarks/fsdp_memory_bench.py --worlds 1 2 --hidden 64 --vocab 512 --tokens 32   # seconds

For each world size W, `torchrun --nproc_per_node W` runs this file as a worker on every rank: a Llama (fp32,
`--layers` × `--hidden`, untied head, vocab `--vocab`) is `fully_shard`-ed (every decoder layer, then the root),
the valuer is built with a diag or kfac Fisher (random, positive; the full Fisher handed in is dropped after the
valuer is built, as a user would), the weights are nudged (drift live), and one masked step (`value_and_loss`,
backward, SGD step) is measured after a warm-up step. Per rank:

* `theta0_mib`  — θ₀ held by the valuer (`Anchor.nbytes()`: its shards);
* `fisher_mib`  — the Fisher entries held by the valuer (a diag entry is a shard like its weight; kfac vectors
                  are whole on every rank);
* `weights_mib` — the model's own parameter shards, for scale;
* `step_peak_mib` — peak RSS of the measured step above the RSS just before it (`/proc/self/clear_refs` resets
                  the high-water mark; `malloc_trim` first), i.e. the step's transient memory: gathered weights,
                  the drift's gathered θ₀ / Fisher of one layer at a time, activations, gradients;
* `plain_step_peak_mib` — the same measure for a plain FSDP2 step of the same model and batch
                  (`model(**batch, labels).loss.backward()`, SGD step), measured first, without a valuer;
* `rss_mib`     — resident memory before the AlphaToken step (everything the process holds, libraries included).

CSV columns: world, rank, the figures above, the model size, and the metadata of every stored row (device, date,
library versions, git revision). The summary printed per world is the largest value over the ranks.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import torch  # noqa: E402

from memory_bench import _rss_kib, _trim  # noqa: E402  (one RSS probe for both memory benchmarks)

FIGURES = ("theta0_mib", "fisher_mib", "weights_mib", "step_peak_mib", "plain_step_peak_mib", "rss_mib")
COLUMNS = ["bench", "world", "rank", "fisher", *FIGURES, "params", "layers", "hidden", "vocab", "tokens",
           "device", "date", "torch", "transformers", "alphatoken", "git_rev"]
MIB = 2 ** 20


def _step_peak(step, dist) -> int:
    """Peak RSS (bytes) of one call of `step` above the RSS just before it, after a warm-up call (allocator pools,
    AlphaToken's first-step check of its fused head)."""
    step()
    _trim()
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kib("VmRSS") * 1024
    step()
    return _rss_kib("VmHWM") * 1024 - base


# ------------------------------------------------------------------------------------------------ one rank
def _worker(args) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import torch.distributed as dist

    import alphatoken as at
    from alphatoken.layers import discover_layers
    from alphatoken.sharding import fully_shard_causal_lm, local_nbytes
    import step_bench as SB

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    code = 0
    try:
        spec = dict(layers=args.layers, hidden=args.hidden, inter=int(args.hidden * 2.6875), heads=4, kv=4,
                    vocab=args.vocab, tie=False, B=1, T=args.tokens, dtype=torch.float32)
        model = SB.build_model(spec, torch.device("cpu"))
        params = sum(p.numel() for p in model.parameters())
        fully_shard_causal_lm(model, "root")  # every decoder layer, then the root (as tests/fsdp_worker.py)
        batch = SB.make_batch(spec, torch.device("cpu"))
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def plain():
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        plain_peak = _step_peak(plain, dist)
        g = torch.Generator().manual_seed(0)
        layers = discover_layers(model, "all", False)
        if args.fisher == "diag":
            fisher = at.Fisher("diag", {layer.name: torch.rand(*layer.shape, generator=g) + 0.1 for layer in layers})
        else:
            fisher = at.Fisher("kfac", {layer.name: (torch.rand(layer.shape[0], generator=g) + 0.1,
                                                     torch.rand(layer.shape[1], generator=g) + 0.1)
                                        for layer in layers})
        valuer = at.AlphaToken(model, at.AlphaTokenConfig(target="batch", keep_ratio=0.6, global_selection=True),
                               fisher=fisher)
        del fisher, layers  # the valuer keeps its own (sharded) entries
        with torch.no_grad():  # θ ≠ θ₀: the drift terms are live
            for p in model.parameters():
                local = p.to_local()
                local.add_(1e-3 * torch.randn(local.shape, generator=g))

        def step():
            valuer.value_and_loss(batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        base = _rss_kib("VmRSS") * 1024
        peak = _step_peak(step, dist)
        fisher_bytes = sum(local_nbytes(t) for entry in valuer.fisher_entries.values() for t in entry[1:])
        row = {"world": world, "rank": rank, "fisher": args.fisher, "params": params,
               "theta0_mib": valuer.anchor.nbytes() / MIB, "fisher_mib": fisher_bytes / MIB,
               "weights_mib": sum(local_nbytes(p) for p in model.parameters()) / MIB,
               "step_peak_mib": peak / MIB, "plain_step_peak_mib": plain_peak / MIB, "rss_mib": base / MIB}
        with open(os.path.join(args.worker, f"rank{rank}.json"), "w") as f:
            json.dump(row, f)
        valuer.close()
        dist.barrier()
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        # gloo teardown before leaving, and no interpreter teardown (a gloo thread can abort the process there)
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# --------------------------------------------------------------------------------------------- the driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int, args, tmp: Path) -> list[dict]:
    """Run the worker on `world` ranks; the ranks' rows."""
    out = tmp / f"world{world}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(_free_port()), str(Path(__file__).resolve()), "--worker", str(out), "--layers", str(args.layers),
           "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--tokens", str(args.tokens),
           "--fisher", args.fisher]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "ALPHATOKEN_PROGRESS": "0"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"world {world} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--fisher", choices=("diag", "kfac"), default="diag")
    parser.add_argument("--csv", type=Path, default=None, help="default: benchmarks/results/fsdp_memory_cpu_<date>.csv")
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    import tempfile

    import bench_common as C

    env = C.environment(torch.device("cpu"), "fsdp2")
    path = args.csv or _HERE / "results" / f"fsdp_memory_cpu_{env['date']}.csv"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            ranks = measure(world, args, Path(tmp))
            for r in ranks:
                rows.append({"bench": "fsdp_memory", **r, "layers": args.layers, "hidden": args.hidden,
                             "vocab": args.vocab, "tokens": args.tokens,
                             **{k: env[k] for k in ("device", "date", "torch", "transformers", "alphatoken",
                                                    "git_rev")}})
            top = {k: max(r[k] for r in ranks) for k in FIGURES}
            print(f"world {world}: per rank (max over ranks) θ₀ {top['theta0_mib']:.2f} MiB, Fisher "
                  f"{top['fisher_mib']:.2f} MiB, weights {top['weights_mib']:.2f} MiB, step peak "
                  f"{top['step_peak_mib']:.1f} MiB (plain FSDP2 step {top['plain_step_peak_mib']:.1f} MiB), RSS {top['rss_mib']:.0f} MiB", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: (f"{row[c]:.4f}" if isinstance(row[c], float) else row[c]) for c in COLUMNS})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
