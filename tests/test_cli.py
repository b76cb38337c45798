"""The `alphatoken` console script end to end on tiny inputs, and its one-line errors for bad input.

The CLI runs in-process through `main(argv)` (output captured), plus one real subprocess of the installed script.
A tiny random Llama with the toy char tokenizer, saved as a local model folder, stands in for a user's model.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from cli_helpers import DPO_LINES, SFT_LINES, _jsonl, make_model_dir, run_cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def data(tmp_path):
    return _jsonl(tmp_path / "sft.jsonl", SFT_LINES), _jsonl(tmp_path / "dpo.jsonl", DPO_LINES)


# ----------------------------------------------------------------------------------------------------- score


def test_score_sft(capsys, tmp_path, model_dir, data):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "score", data[0], "--model", model_dir, "--out", out, "--keep-ratio", "0.5",
                                "--fisher", "kfac", "--batch-size", "2", "--save-fisher")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["fisher.safetensors", "report.html", "summary.json", "values.jsonl"]
    rows = [json.loads(l) for l in (out / "values.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4]
    valued = sum(r["n_valued"] for r in rows)
    kept = sum(r["n_kept"] for r in rows)
    assert kept == -(-valued // 2)  # dataset-wide top half
    for r in rows:
        n = len(r["input_ids"])
        assert all(len(r[f]) == n for f in ("labels", "tokens", "alphatoken_keep", "alphatoken_response",
                                            "masked_labels", "alphatoken_total", "alphatoken_adaptation",
                                            "alphatoken_stability", "alphatoken_direct", "alphatoken_causal"))
        assert all((l == -100) == (not k) for l, k in zip(r["masked_labels"], r["alphatoken_keep"]))
        assert r["tokens"][0] == "<bos>"
        assert "".join(t for t, v in zip(r["tokens"], r["alphatoken_response"]) if v).startswith(r["response"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == kept and summary["kind"] == "sft"
    assert "keep" in (out / "report.html").read_text()
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("json", data_files=str(out / "values.jsonl"), split="train")
    assert ds.num_rows == 4 and "alphatoken_keep" in ds.column_names
    # the library's offline mode trains straight from these masks
    from alphatoken.offline import apply_masks

    masked = apply_masks(ds)
    assert masked["labels"] == [r["masked_labels"] for r in rows]


def test_score_dpo_builtin_model_paths(capsys, tmp_path, data):
    pytest.importorskip("alphatoken.toy")
    from alphatoken.toy import BUILTIN_DIR

    if not (BUILTIN_DIR / "model.safetensors").exists():
        pytest.skip("the built-in toy model is not built")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "score", data[1], "--out", out, "--fisher", "none", "--selection", "sequence",
                           "--paths", "direct", "--select-within", "batch")
    assert code == 0, err
    rows = [json.loads(l) for l in (out / "values.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert {"chosen_alphatoken_keep", "rejected_alphatoken_total", "rejected_masked_labels"} <= set(rows[0])
    assert all(r["chosen_n_kept"] >= 1 and r["rejected_n_kept"] >= 1 for r in rows)
    assert all(v == 0 for r in rows for v in r["chosen_alphatoken_stability"])  # no Fisher: stability is 0
    html = (out / "report.html").read_text()
    assert "chosen" in html and "rejected" in html


def test_score_failure_leaves_nothing(capsys, tmp_path, model_dir, data, monkeypatch):
    """A crash after valuing (here: in the report) must not leave a half-written output behind."""
    import alphatoken.report as report

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "render_report", broken)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "score", data[0], "--model", model_dir, "--out", out, "--fisher", "none")
    assert code == 1 and "disk on fire" in err and "Traceback" not in err
    assert not out.exists() or os.listdir(out) == []


# ----------------------------------------------------------------------------------------------------- train


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "final" / "model.safetensors"))


def test_train_checkpoints_and_exact_resume(capsys, tmp_path, model_dir, data):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {model_dir}\ndata: {data[0]}\nsteps: 4\nbatch_size: 2\nlr: 3e-3\nsave_every: 2\n"
                      "fisher: diag\nalphatoken:\n  keep_ratio: 0.5\n", encoding="utf-8")
    whole, split = tmp_path / "whole", tmp_path / "split"
    code, stdout, err = run_cli(capsys, "train", "--config", config, "--out", whole)
    assert code == 0, err
    assert sorted(os.listdir(whole / "checkpoints")) == ["step-000002", "step-000004"]
    assert sorted(os.listdir(whole / "checkpoints" / "step-000002")) == ["model.safetensors", "optimizer.pt",
                                                                        "rng.pt", "state.json"]
    metrics = json.loads((whole / "metrics.json").read_text())
    assert len(metrics["history"]) == 4 and 0 < metrics["tokens_trained"] < metrics["response_tokens"]
    # interrupted after 2 steps, then resumed: the same weights, bit for bit
    assert run_cli(capsys, "train", "--config", config, "--out", split, "--steps", "2")[0] == 0
    code, stdout, err = run_cli(capsys, "train", "--config", config, "--out", split, "--resume")
    assert code == 0, err
    assert "resuming from" in stdout
    a, b = _weights(whole), _weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((split / "metrics.json").read_text())["history"] == metrics["history"]
    # resuming with a setting that would change the run is refused
    code, _, err = run_cli(capsys, "train", "--config", config, "--out", split, "--resume", "--steps", "6",
                           "--lr", "0.1")
    assert code == 2 and "--resume: lr" in err
    # starting over a run folder that has checkpoints is refused too
    code, _, err = run_cli(capsys, "train", "--config", config, "--out", split)
    assert code == 2 and "already has checkpoints" in err


def test_train_dpo(capsys, tmp_path, model_dir, data):
    out = tmp_path / "dpo"
    code, stdout, err = run_cli(capsys, "train", "--model", model_dir, "--data", data[1], "--out", out, "--steps", "2",
                                "--batch-size", "2", "--fisher", "kfac", "--beta", "0.2", "--keep-ratio", "0.7")
    assert code == 0, err
    assert "DPO" in stdout
    assert (out / "final" / "config.json").is_file()
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert len(hist) == 2 and all(0 < h["kept"] <= h["response_tokens"] for h in hist)


# ----------------------------------------------------------------------------------------------------- bench


def test_bench_builtin(capsys):
    code, stdout, err = run_cli(capsys, "bench", "--builtin", "--quick")
    assert code == 0, err
    assert "bilinear" in stdout and "ghost_dot" in stdout and "median_ms" in stdout


def test_bench_script(capsys, tmp_path):
    from alphatoken.cli import _find_bench_script

    if _find_bench_script() is None:
        pytest.skip("benchmarks/gpu_bench.py is not in this checkout")
    code, stdout, err = run_cli(capsys, "bench", "--cpu", "--quick", "--no-step", "--no-compile", "--ops",
                                "bilinear", "--csv", tmp_path / "rows.csv")
    assert code == 0, err
    assert "bilinear" in stdout and (tmp_path / "rows.csv").is_file()


FAKE_BENCH = """
import os
def run(quick=False, cpu=False, *, step=True, compile=None, csv_path=None, ops=None, log=print, **kw):
    if csv_path:
        with open(csv_path, "w") as fh:
            fh.write("op,median_ms\\nbilinear,1.0\\n")
    if os.environ.get("FAKE_BENCH_FAIL"):
        raise RuntimeError("bench broke halfway")
    log(f"rows in {csv_path}")
    return [{"op": "bilinear", "median_ms": 1.0}]
def format_table(rows):
    return "op median_ms\\n" + "\\n".join(f"{r['op']} {r['median_ms']}" for r in rows)
"""


def test_bench_csv_checked_first_and_written_whole(capsys, tmp_path, monkeypatch):
    """--csv is checked before any timing (status 2, one line) and appears only once the run is complete:
    the script's rows-as-they-come CSV goes to a temporary file that a failed run leaves nowhere."""
    bench_dir = tmp_path / "benchmarks"
    bench_dir.mkdir()
    (bench_dir / "gpu_bench.py").write_text(FAKE_BENCH, encoding="utf-8")
    monkeypatch.setenv("ALPHATOKEN_BENCHMARKS", str(bench_dir))
    (tmp_path / "a_file").write_text("x")
    bad = tmp_path / "a_file" / "r.csv"
    for flags in (["--builtin"], []):
        code, stdout, err = run_cli(capsys, "bench", "--cpu", "--quick", *flags, "--csv", bad)
        assert code == 2 and stdout == "", (flags, err)
        assert err.strip().splitlines() == [f"alphatoken: error: --csv {bad}: cannot write output there "
                                            "(Not a directory); pass a writable --csv path"]
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("FAKE_BENCH_FAIL", "1")
    code, _, err = run_cli(capsys, "bench", "--cpu", "--quick", "--csv", out / "rows.csv")
    assert code == 1 and "bench broke halfway" in err
    assert os.listdir(out) == []  # neither rows.csv nor its temporary file
    monkeypatch.delenv("FAKE_BENCH_FAIL")
    code, stdout, err = run_cli(capsys, "bench", "--cpu", "--quick", "--csv", out / "rows.csv")
    assert code == 0, err
    assert os.listdir(out) == ["rows.csv"] and "bilinear,1.0" in (out / "rows.csv").read_text()
    assert f"rows in {out / 'rows.csv'}" in err and "bilinear 1.0" in stdout


# ------------------------------------------------------------------------------------------------------ demo


def test_demo_small(capsys, tmp_path, monkeypatch):
    """`alphatoken demo --steps 2` end to end; the toy's evaluation sets are shrunk so the test stays short."""
    from alphatoken import toy
    from alphatoken.toy import experiment

    if not (toy.BUILTIN_DIR / "model.safetensors").exists():
        pytest.skip("the built-in toy model is not built")
    real_eval, real_data = experiment.retention_eval_sets, experiment.target_data
    monkeypatch.setattr(experiment, "retention_eval_sets", lambda n=200, seed=12345: real_eval(min(n, 8), seed))
    monkeypatch.setattr(experiment, "target_data",
                        lambda n_train=2000, seed=0, noise=None, **k: real_data(n_train=min(n_train, 64), n_eval=8,
                                                                                seed=seed, noise=noise))
    monkeypatch.setattr(experiment, "_BEFORE_CACHE", {})
    out = tmp_path / "demo"
    code, stdout, err = run_cli(capsys, "demo", "--steps", "2", "--out", out, "--quiet")
    assert code == 0, err
    for needle in ("target exact match", "retention", "tokens trained", "every token", "AlphaToken"):
        assert needle in stdout
    assert sorted(os.listdir(out)) == ["demo.json", "report.html"]
    result = json.loads((out / "demo.json").read_text())
    assert set(result["methods"]) == {"full", "alphatoken"}
    assert result["methods"]["alphatoken"]["tokens_trained"] < result["methods"]["full"]["tokens_trained"]
    assert result["settings"]["keep_ratio"] == 0.8  # the default: where the toy shows the gain
    alpha = result["methods"]["alphatoken"]
    assert 0.75 <= alpha["tokens_trained"] / alpha["response_tokens"] <= 0.9
    html = (out / "report.html").read_text()
    assert "Comparison" in html and "known noise" in html


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("case", ["missing_file", "bad_json", "missing_field", "empty_response", "no_config",
                                  "unwritable_out", "bad_yaml", "resume_nothing", "bad_keep_ratio",
                                  "bad_report_limit"])
def test_bad_input_one_line_error(capsys, tmp_path, model_dir, case):
    good = _jsonl(tmp_path / "good.jsonl", SFT_LINES)
    model = str(model_dir)
    if case == "missing_file":
        argv, expect = ["score", tmp_path / "nope.jsonl", "--model", model], "nope.jsonl: no such file"
    elif case == "bad_json":
        p = tmp_path / "bad.jsonl"
        p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b"\n', encoding="utf-8")
        argv, expect = ["score", p, "--model", model], "bad.jsonl:2: not valid JSON"
    elif case == "missing_field":
        p = _jsonl(tmp_path / "mf.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "answer": "b"}])
        argv, expect = ["score", p, "--model", model], "mf.jsonl:2: missing field 'response'"
    elif case == "empty_response":
        p = _jsonl(tmp_path / "er.jsonl", [{"prompt": "S:1>", "response": "1"}, {"prompt": "S:2>", "response": ""}])
        argv, expect = ["score", p, "--model", model, "--out", tmp_path / "o"], "er.jsonl:2: response '' tokenizes to nothing"
    elif case == "no_config":
        empty = tmp_path / "empty_model"
        empty.mkdir()
        argv, expect = ["score", good, "--model", empty], "no config.json in the model directory"
    elif case == "unwritable_out":
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        argv, expect = ["score", good, "--model", model, "--out", blocker / "out"], "cannot write output there"
    elif case == "bad_yaml":
        p = tmp_path / "run.yaml"
        p.write_text("steps: 3\ndata: [unclosed\n", encoding="utf-8")
        argv, expect = ["train", "--config", p], "run.yaml:"
    elif case == "resume_nothing":
        argv, expect = ["train", "--data", good, "--model", model, "--out", tmp_path / "r", "--resume"], "no checkpoint"
    elif case == "bad_report_limit":
        argv, expect = ["score", good, "--model", model, "--report-limit", "-1"], "--report-limit must be >= 0"
    else:
        argv, expect = ["score", good, "--model", model, "--keep-ratio", "1.5"], "keep_ratio must be in (0, 1]"
    if argv[0] == "score" and "--out" not in argv:
        argv += ["--out", tmp_path / "o"]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 2
    assert expect in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alphatoken: error: "), err
    assert "Traceback" not in err + stdout
    assert not (tmp_path / "o").exists()  # a failed run leaves no output folder behind


def test_console_script_subprocess(tmp_path):
    """The installed `alphatoken` script itself: a bad JSON line gives one line on stderr and exit status 2."""
    exe = shutil.which("alphatoken", path=os.path.dirname(sys.executable)) or shutil.which("alphatoken")
    if exe is None:
        pytest.skip("the alphatoken console script is not installed (pip install -e .)")
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\nnot json\n', encoding="utf-8")
    env = dict(os.environ, ALPHATOKEN_DEBUG="0")
    run = subprocess.run([exe, "score", str(p)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 2
    assert run.stderr.strip() == (f"alphatoken: error: {p}:2: not valid JSON (Expecting value at column 1); "
                                  "each line must be one JSON object")
    assert run.stdout == ""


def test_version_and_no_command(capsys):
    code, out, err = run_cli(capsys, "--version")
    assert code == 0 and out.startswith("alphatoken ")
    code, out, err = run_cli(capsys)
    assert code == 2 and "demo" in err
    code, out, err = run_cli(capsys, "score")  # argparse usage error: its own message, status 2
    assert code == 2 and "required" in err


# -------------------------------------------------------------------------------------------------- progress


def test_progress_quiet_off_terminal(capsys, monkeypatch):
    from alphatoken import progress as P

    monkeypatch.delenv("ALPHATOKEN_PROGRESS", raising=False)
    items = [1, 2, 3]
    assert P.progress(items, "x") is items  # captured stderr is not a terminal: no bar, the iterable itself
    bar = P.progress(None, "x", total=3)
    bar.update(1), bar.set_postfix(loss=1.0), bar.close()
    assert list(P.progress(items, "x", enabled=True)) == items  # forced on: a tqdm bar
    assert "x:" in capsys.readouterr().err
    monkeypatch.setenv("ALPHATOKEN_PROGRESS", "1")
    assert P.progress_enabled() is True
    P.set_progress(False)
    try:
        assert P.progress(items, "x") is items
    finally:
        P.set_progress(None)
