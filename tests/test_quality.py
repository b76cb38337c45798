"""The quality harness end to end on a tiny budget: rows, table and CSV come out, metrics are in range."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest

from alphatoken import toy

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (toy.BUILTIN_DIR / "model.safetensors").exists(),
                                reason="built-in toy model not built (python -m alphatoken.toy.build)")


def load_run():
    spec = importlib.util.spec_from_file_location("quality_run", ROOT / "benchmarks" / "quality" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quality_run"] = mod
    spec.loader.exec_module(mod)
    return mod


def engine_available():
    return importlib.util.find_spec("alphatoken.engine") is not None


def test_harness_end_to_end(tmp_path):
    run = load_run()
    methods = "full,random,at_adapt" if engine_available() else "full,random,rho1"
    out = run.main(["--seeds", "0", "--steps", "3", "--methods", methods, "--out", str(tmp_path),
                    "--n-train", "128", "--n-eval-retention", "20", "--n-eval-target", "20", "--batch-size", "8", "--keep-ratio", "0.5"])
    assert (tmp_path / "results.csv").exists() and (tmp_path / "table.md").exists()
    rows = run.read_rows(tmp_path / "results.csv")
    assert [r["method"] for r in rows] == methods.split(",")
    for r in rows:
        for key in ["target_exact_match", "mean_drop", "noise_dropped_share", "clean_dropped_share",
                    *[f"{t}_{w}" for t in toy.RETENTION_TASKS for w in ("before", "after")]]:
            assert -1.0 <= r[key] <= 1.0 and not math.isnan(r[key]), (key, r[key])
        for t in toy.RETENTION_TASKS:
            assert math.isclose(r[f"{t}_drop"], r[f"{t}_before"] - r[f"{t}_after"], abs_tol=1e-9)
        assert r["tokens_trained"] > 0 and r["wall_time"] > 0
        if r["method"] == "full":
            assert r["tokens_trained"] == r["response_tokens"]
        else:
            assert 0.45 < r["tokens_trained"] / r["response_tokens"] < 0.65
    md = (tmp_path / "table.md").read_text()
    for name in methods.split(","):
        assert f"| {name} | 1 |" in md
    assert "target EM" in md and "±" in md
    # rerunning skips the rows already in the CSV
    run.main(["--seeds", "0", "--steps", "3", "--methods", "full", "--out", str(tmp_path), "--n-train", "128",
              "--n-eval-retention", "20", "--n-eval-target", "20", "--batch-size", "8", "--keep-ratio", "0.5"])
    assert len(run.read_rows(tmp_path / "results.csv")) == len(rows)


def test_table_formats_mean_and_std():
    run = load_run()
    rows = [{"method": "m", "seed": s, **{k: v for k, _ in run.TABLE_COLUMNS for v in [float(s)]}}
            for s in (0, 1, 2)]
    md = run.table(rows)
    assert "| m | 3 | 1.000 ± 1.000 |" in md


def test_keep_eos_applies_to_every_masking_method():
    """--keep-eos: scorers and AlphaToken alike keep every <eos> (always_keep_token_ids), whatever its score."""
    from alphatoken.config import AlphaTokenConfig
    from alphatoken.scorers import make_scorer

    run = load_run()
    specs = run.resolve_methods("full,random,loss_high,at_adapt", {}, "", (2,))
    assert "always_keep_token_ids" not in specs[0].config
    assert all(s.config["always_keep_token_ids"] == [2] for s in specs[1:])
    model, tokenizer = toy.load_builtin()
    batch = toy.collate(toy.target_data(n_train=16, n_eval=8, seed=0).train, tokenizer)
    eos = batch["labels"] == tokenizer.eos_token_id
    for name in ("random", "loss_high", "excess_loss"):
        cfg = AlphaTokenConfig(keep_ratio=0.6, always_keep_token_ids=(tokenizer.eos_token_id,))
        with make_scorer(name, model, cfg) as scorer:
            tv = scorer.value(batch)
        assert bool(tv.mask[eos].all()), name
        assert int(tv.mask.sum()) == math.ceil(0.6 * int(tv.response.sum()))  # eos uses up budget


def test_paired_read_out_against_full_and_the_lr_curve():
    """compare.paired: per-seed differences to full SFT (mean ± se) and the gap to the full-SFT lr curve."""
    spec = importlib.util.spec_from_file_location("quality_compare", ROOT / "benchmarks" / "quality" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)

    def row(method, seed, em, drop):
        return {"method": method, "seed": seed, "target_exact_match": em, "mean_drop": drop}

    rows = [row("full", 0, 0.30, 0.80), row("full", 1, 0.20, 0.60),        # curve point (0.70, 0.25)
            row("full_lr1e-4", 0, 0.05, 0.20), row("full_lr1e-4", 1, 0.15, 0.40),  # curve point (0.30, 0.10)
            row("m", 0, 0.28, 0.50), row("m", 1, 0.22, 0.50), row("m", 2, 0.90, 0.90)]  # seed 2 has no full
    (res,) = compare.paired(rows, ["m"])
    assert res["seeds"] == 3 and res["paired_seeds"] == 2
    assert math.isclose(res["d_em"][0], ((0.28 - 0.30) + (0.22 - 0.20)) / 2, abs_tol=1e-12)
    assert math.isclose(res["d_drop"][0], ((0.50 - 0.80) + (0.50 - 0.60)) / 2, abs_tol=1e-12)
    assert math.isclose(res["d_drop"][1], 0.1, rel_tol=1e-9)  # stdev of (-0.3, -0.1) is 0.1·√2; / √2
    # the method's mean drop 0.633 is inside the curve: EM on the curve there is 0.10 + 0.15·(0.333/0.40)
    drop = (0.5 + 0.5 + 0.9) / 3
    assert math.isclose(res["curve_gap"], (0.28 + 0.22 + 0.90) / 3 - (0.10 + 0.15 * (drop - 0.30) / 0.40), rel_tol=1e-9)
    assert "| m | 3 |" in compare.markdown([res])
