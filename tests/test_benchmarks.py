"""Smoke test of the benchmark suite: the GPU script's tiny CPU mode runs, writes its CSV, and its numbers
are sane (positive, finite ratios; device, date and versions in every row). Seconds, not minutes."""
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


def test_kernel_rows_sane(smoke_rows):
    _, rows, _ = smoke_rows
    kernel = [r for r in rows if r["bench"] == "kernel" and r["status"] == "ok"]
    assert {r["op"] for r in kernel} == {"bilinear", "fisher_norm", "bilinear_fisher_norm", "ghost_dot"}
    assert {r["provider"] for r in kernel} >= {"reference", "torch", "materialized"}
    for r in kernel:
        for key in ("median_ms", "tflops", "pct_of_matmul", "speedup_vs_torch", "speedup_vs_materialized"):
            v = float(r[key])
            assert math.isfinite(v) and v > 0, (key, r)
        assert float(r["q20_ms"]) <= float(r["median_ms"]) <= float(r["q80_ms"])
        assert "rel_err=" in r["note"]


def test_step_rows_sane(smoke_rows):
    _, rows, stdout = smoke_rows
    step = [r for r in rows if r["bench"] == "step"]
    assert any(r["provider"] == "plain" for r in step)
    assert len(step) >= 3
    for r in step:
        v = float(r["ratio_vs_plain"])
        assert math.isfinite(v) and v > 0, r
    assert "x plain" in stdout and "device:" in stdout  # the one printed table


def test_importable_by_path_and_table():
    mod = _load("alphatoken_gpu_bench_2", SCRIPT)
    assert callable(mod.run) and callable(mod.format_table)
    assert mod.format_table([]) == ""
