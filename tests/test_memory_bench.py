"""Smoke test of benchmarks/memory_bench.py: a tiny vocabulary, the plain step and one AlphaToken mode, each in
its own subprocess; the rows carry the schema's metadata and positive peaks. Seconds, not minutes."""
import contextlib
import csv
import importlib.util
import io
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_memory_bench_writes_sane_rows(tmp_path):
    spec = importlib.util.spec_from_file_location("alphatoken_memory_bench", ROOT / "benchmarks" / "memory_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "memory.csv"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = mod.main(["--cpu", "--vocab", "2048", "--tokens", "64", "--csv", str(out),
                       "--providers", "plain", "liger", "alphatoken:full/kfac"])
    assert rc == 0, buf.getvalue()[-2000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["provider"] for r in rows] == ["plain", "liger", "alphatoken"]
    assert rows[1]["status"] == "skipped" and "GPU" in rows[1]["note"]
    for r in (rows[0], rows[2]):
        assert r["status"] == "ok" and r["bench"] == "memory" and r["V"] == "2048" and r["N"] == "64"
        assert float(r["peak_mib"]) > 0 and float(r["median_ms"]) > 0
        assert r["device"] and r["date"] and r["torch"] and r["alphatoken"]
    assert rows[2]["note"].startswith("full/kfac") and float(rows[2]["ratio_vs_plain"]) > 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert mod.plot(rows, tmp_path / "memory.png").exists()
