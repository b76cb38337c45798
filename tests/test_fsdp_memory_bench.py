"""Smoke test of benchmarks/fsdp_memory_bench.py: world sizes 1 and 2 on a tiny Llama; the rows carry the
metadata, and θ₀ and the diag Fisher per rank are the single process's split over the ranks (1/world)."""
import contextlib
import csv
import importlib.util
import io
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fsdp_memory_bench_shows_one_over_world(tmp_path):
    spec = importlib.util.spec_from_file_location("alphatoken_fsdp_memory_bench",
                                                  ROOT / "benchmarks" / "fsdp_memory_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "fsdp.csv"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = mod.main(["--worlds", "1", "2", "--layers", "2", "--hidden", "64", "--vocab", "512", "--tokens", "32",
                       "--csv", str(out)])
    assert rc == 0, buf.getvalue()[-2000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["world"], r["rank"]) for r in rows] == [("1", "0"), ("2", "0"), ("2", "1")]
    for r in rows:
        assert r["bench"] == "fsdp_memory" and r["device"] and r["date"] and r["torch"] and r["git_rev"]
        assert float(r["step_peak_mib"]) > 0 and float(r["plain_step_peak_mib"]) > 0 and float(r["rss_mib"]) > 0
    one, two = rows[0], rows[1:]
    for key in ("theta0_mib", "fisher_mib", "weights_mib"):
        whole = float(one[key])
        assert whole > 0
        assert abs(sum(float(r[key]) for r in two) - whole) < 1e-3, key  # the shards add up to the whole
        assert max(float(r[key]) for r in two) < 0.6 * whole, key  # each rank holds about half
