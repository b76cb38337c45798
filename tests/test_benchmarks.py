"""The benchmark suite on tiny CPU shapes: the GPU script's quick CPU mode runs and writes its CSV, its providers
computed the right values (the rows' own rel_err against float64), the derived columns follow from the measured
ones, the cost model behaves, and `alphatoken bench --builtin` marks its extrapolated rows. Seconds, not minutes."""
import contextlib
import csv
import importlib.util
import io
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_bench.py"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def smoke_rows(tmp_path_factory):
    """The script's own entry point, in-process (a subprocess would pay torch's import again):
    `gpu_bench.py --cpu --quick --no-compile --interpret off --csv <tmp>`."""
    out = tmp_path_factory.mktemp("bench") / "smoke.csv"
    mod = _load("alphatoken_gpu_bench", SCRIPT)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = mod.main(["--cpu", "--quick", "--no-compile", "--interpret", "off", "--csv", str(out)])
    assert rc == 0, buf.getvalue()[-3000:]
    assert out.exists()
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    return header, rows, buf.getvalue()


def test_csv_columns_and_metadata(smoke_rows):
    header, rows, _ = smoke_rows
    common = _load("alphatoken_bench_common", ROOT / "benchmarks" / "bench_common.py")
    assert header == common.COLUMNS
    assert rows
    for r in rows:
        for key in ("device", "date", "torch", "triton", "transformers", "alphatoken"):
            assert r[key], f"row without {key}: {r}"
        assert r["status"] in ("ok", "skipped"), r


def _rel_err(note: str) -> float:
    return float(note.split("rel_err=")[1].split()[0].rstrip(";,"))


def test_kernel_rows_are_correct_and_consistent(smoke_rows):
    _, rows, _ = smoke_rows
    bench = _load("alphatoken_gpu_bench_flops", SCRIPT)
    kernel = [r for r in rows if r["bench"] == "kernel" and r["status"] == "ok"]
    assert {r["op"] for r in kernel} == {"bilinear", "fisher_norm", "bilinear_fisher_norm", "ghost_dot"}
    assert {r["provider"] for r in kernel} >= {"reference", "torch", "materialized"}
    by_case = {}
    for r in kernel:
        by_case.setdefault((r["op"], r["dtype"], r["N"], r["d_in"]), {})[r["provider"]] = r
    for r in kernel:
        for key in ("median_ms", "tflops", "pct_of_matmul", "speedup_vs_torch", "speedup_vs_materialized"):
            v = float(r[key])
            assert math.isfinite(v) and v > 0, (key, r)
        assert float(r["q20_ms"]) <= float(r["median_ms"]) <= float(r["q80_ms"])
        assert _rel_err(r["note"]) < 1e-4, r  # fp32 on CPU: each provider computed the op's values
        N, d_in, d_out = int(r["N"]), int(r["d_in"]), int(r["d_out"])
        V = int(r["V"]) if r["V"] else None
        flops = {"bilinear": 2 * N * d_in * d_out, "fisher_norm": 2 * N * d_in * d_out,
                 "bilinear_fisher_norm": 4 * N * d_in * d_out, "ghost_dot": 2 * N * (V or 0) * (d_in + d_out)}[r["op"]]
        assert math.isclose(float(r["flops"]), flops, rel_tol=1e-5), r
        assert math.isclose(float(bench.flops_of(r["op"], N, V, d_in, d_out)), flops)
        med = float(r["median_ms"])
        assert math.isclose(float(r["tflops"]), flops / (med * 1e-3) / 1e12, rel_tol=1e-4), r
        assert math.isclose(float(r["pct_of_matmul"]), 100 * float(r["matmul_ms"]) / med, rel_tol=1e-4), r
        peers = by_case[(r["op"], r["dtype"], r["N"], r["d_in"])]
        assert math.isclose(float(r["speedup_vs_torch"]), float(peers["torch"]["median_ms"]) / med, rel_tol=1e-4)
        assert math.isclose(float(r["speedup_vs_materialized"]), float(peers["materialized"]["median_ms"]) / med,
                            rel_tol=1e-4)


def test_step_rows_are_ratios_to_the_plain_step_of_the_same_run(smoke_rows):
    _, rows, stdout = smoke_rows
    step = [r for r in rows if r["bench"] == "step"]
    plain = [r for r in step if r["provider"] == "plain"]
    assert len(plain) == 1 and float(plain[0]["ratio_vs_plain"]) == 1.0
    assert len(step) >= 3
    for r in step:
        v = float(r["ratio_vs_plain"])
        assert math.isfinite(v) and v > 0, r
        assert r["N"] == plain[0]["N"] and r["d_out"] == plain[0]["d_out"]  # one model, one batch
    assert "x plain" in stdout and "device:" in stdout  # the one printed table
    table = _load("alphatoken_gpu_bench_2", SCRIPT).format_table(rows)
    for r in step:
        assert r["op"] in table


def test_cost_model_of_the_current_engine():
    """`cost_model_ratio` counts GEMM FLOPs of the engine's work; one case by hand, the rest by ordering."""
    step = _load("alphatoken_step_bench", ROOT / "benchmarks" / "step_bench.py")
    spec = dict(hidden=8, inter=16, layers=2, vocab=50, heads=2, kv=1, B=2, T=5, last_k=1)
    n = 6
    tok, h, V = 10, 8, 50
    p_block = 2 * h * h + 2 * h * 4 + 3 * h * 16
    attn = 4 * 2 * 25 * h
    F = 2 * tok * (2 * p_block + h * V) + 2 * attn
    want = (3 * F + 2 * n * h * V * 2) / (3 * F)  # direct, no Fisher: U_head and one bilinear over n rows
    assert math.isclose(step.cost_model_ratio(spec, n, "direct", "none", "all"), want, rel_tol=1e-12)
    r = lambda *a, **k: step.cost_model_ratio(spec, n, *a, **k)  # noqa: E731
    assert 1 < r("direct", "none", "all") < r("direct", "kfac", "all") < r("direct", "diag", "all")
    assert r("direct", "kfac", "all", drift=False) == r("direct", "none", "all")
    assert r("full", "none", 1) < r("full", "none", "all") and r("direct", "none", "all") < r("full", "none", 1)


def test_builtin_bench_marks_its_extrapolated_rows(tmp_path, capsys):
    """`alphatoken bench --builtin` times the materialized provider on a slice of rows and scales it to N: the
    CSV says so in its `extrapolated` column (and `timed_rows`); every measured row says false."""
    from alphatoken.cli import main

    out = tmp_path / "builtin.csv"
    assert main(["bench", "--builtin", "--quick", "--csv", str(out)]) == 0
    stdout = capsys.readouterr().out
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {"extrapolated", "timed_rows"} <= set(rows[0])
    assert {r["provider"] for r in rows} == {"alphatoken", "torch", "materialized"}
    for r in rows:
        timed, N = int(r["timed_rows"]), int(r["N"])
        assert r["extrapolated"] == ("true" if timed < N else "false"), r
        assert (timed < N) == (r["provider"] == "materialized"), r  # quick shapes: N = 128 > the 64-row slice
        assert math.isfinite(float(r["median_ms"])) and float(r["median_ms"]) > 0
    assert "* extrapolated" in stdout
