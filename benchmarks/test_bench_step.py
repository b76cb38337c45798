"""pytest-benchmark: one training step, plain SFT against AlphaToken's value_and_loss step + backward.

    pytest benchmarks/test_bench_step.py --benchmark-enable

Same models and batches as step_bench.py (CPU: the tiny Llama 4×256, batch 8×128, fp32; CUDA: the
Qwen2-0.5B-like config, bf16), forward + backward, no optimizer step. pytest-benchmark times each configuration
on its own; the side-by-side *ratios* (interleaved rounds, the numbers RESULTS.md reports) come from
`python benchmarks/step_bench.py`.
"""
import warnings

import pytest
import torch

import bench_common as C
import step_bench as SB

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SPEC = SB.model_spec(DEVICE, quick=False)
ENV = C.environment(DEVICE, "pytest-benchmark")
CONFIGS = [(None, None, None)] + [(p, f, t) for p in ("direct", "full") for f in ("none", "kfac", "diag")
                                     for t in ("all", SPEC["last_k"])]


@pytest.fixture(scope="module", autouse=True)
def cpu_runs_the_reference():
    """On a CPU a training step uses the kernels' PyTorch reference, as it would without this folder's
    TRITON_INTERPRET=1 (which is there for the kernel benchmarks): the interpreter would take hours here."""
    import alphatoken.kernels as K

    if DEVICE.type != "cpu":
        yield
        return
    with K.use_backend("reference"):
        yield


@pytest.fixture(scope="module")
def setup():
    model = SB.build_model(SPEC, DEVICE)
    batch = SB.make_batch(SPEC, DEVICE)
    return {"model": model, "batch": batch, "fishers": {}}


def _fisher(setup, kind):
    import alphatoken as at

    if kind == "none":
        return None
    if kind not in setup["fishers"]:
        setup["fishers"][kind] = at.estimate_fisher(setup["model"], [setup["batch"]], kind=kind)
        setup["model"].zero_grad(set_to_none=True)
    return setup["fishers"][kind]


@pytest.mark.parametrize("paths,fisher,tracked", CONFIGS,
                         ids=["plain"] + [f"{p}-{f}-{'all' if t == 'all' else f'last{t}'}" for p, f, t in CONFIGS[1:]])
def test_step(benchmark, setup, paths, fisher, tracked):
    import alphatoken as at

    model, batch = setup["model"], setup["batch"]
    valuer = None
    if paths is None:
        def step():
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
    else:
        cfg = at.AlphaTokenConfig(paths=paths, tracked_layers=tracked, keep_ratio=0.6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f = _fisher(setup, fisher)
            valuer = at.AlphaToken(model, cfg, fisher=f)

        def step():
            valuer.value_and_loss(batch).backward()
            model.zero_grad(set_to_none=True)

    benchmark.group = f"step {SPEC['name']} batch {SPEC['B']}x{SPEC['T']}"
    benchmark.extra_info.update({k: ENV[k] for k in ("device", "date", "torch", "triton", "transformers",
                                                      "alphatoken", "git_rev")})
    try:
        step()
        benchmark.pedantic(lambda: (step(), C.sync(DEVICE)), rounds=5, iterations=1, warmup_rounds=1)
    finally:
        if valuer is not None:
            valuer.close()
