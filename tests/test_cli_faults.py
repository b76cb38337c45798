"""The CLI's bad-input and fault findings (B1-B5, B9-B14, B17-B19, B21), one test each.

Each test fails on commit 4e12289 and passes here. Tiny inputs: a 2-block random Llama, 4 examples, 1-2 steps.
"""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from cli_helpers import SFT_LINES, _jsonl, make_model_dir, run_cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def data(tmp_path):
    return _jsonl(tmp_path / "sft.jsonl", SFT_LINES)


def _one_line(err: str, code: int, expect_code: int = 2) -> str:
    # one error line; warnings (e.g. that --fisher none without --validation values every token 0) may precede it
    lines = [line for line in err.strip().splitlines() if not line.startswith("alphatoken: warning: ")]
    assert code == expect_code and len(lines) == 1 and lines[0].startswith("alphatoken: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _train(capsys, model_dir, data, out, *extra):
    return run_cli(capsys, "train", "--model", model_dir, "--data", data, "--out", out, "--batch-size", "2",
                   "--lr", "1e-3", "--quiet", *extra)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------ data loss


def test_b1_score_out_holding_its_input_is_refused(capsys, tmp_path, model_dir, data):
    out = tmp_path / "out"
    assert run_cli(capsys, "score", data, "--model", model_dir, "--out", out, "--fisher", "none")[0] == 0
    values = out / "values.jsonl"  # an earlier run's values.jsonl is valid input
    before = values.read_bytes()
    code, _, err = run_cli(capsys, "score", values, "--model", model_dir, "--out", out, "--fisher", "none")
    assert "lies inside it" in _one_line(err, code)
    assert values.read_bytes() == before
    # a folder holding files score did not write is not replaced either
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "score", data, "--model", model_dir, "--out", tmp_path / "mine", "--fisher", "none")
    assert "notes.txt" in _one_line(err, code) and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_b2_train_out_holding_its_model_is_refused(capsys, tmp_path, model_dir, data):
    import shutil

    run = tmp_path / "P"
    shutil.copytree(model_dir, run / "final")  # an earlier run's final model, trained on further
    before = (run / "final" / "model.safetensors").read_bytes()
    code, _, err = _train(capsys, run / "final", data, run, "--steps", "1", "--fisher", "none")
    assert "writes over" in _one_line(err, code)
    assert (run / "final" / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(run)) == ["final"]


def test_b3_score_outputs_appear_as_a_set(capsys, tmp_path, model_dir, data, monkeypatch):
    """A failure while writing the outputs (here a full disk at summary.json) leaves the previous set whole."""
    import alphatoken.data as D

    out = tmp_path / "out"
    assert run_cli(capsys, "score", data, "--model", model_dir, "--out", out, "--fisher", "none")[0] == 0
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    real = D.write_json

    def full_disk(path, obj):
        if str(path).endswith("summary.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj)

    monkeypatch.setattr(D, "write_json", full_disk)
    code, _, err = run_cli(capsys, "score", data, "--model", model_dir, "--out", out, "--fisher", "none",
                           "--keep-ratio", "0.3")
    line = _one_line(err, code, 1)
    assert str(out) in line and "No space left on device" in line
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["out", "sft.jsonl"]  # no stray temporaries


# ------------------------------------------------------------------------------------------ unfinished runs


def test_b4_run_died_before_final_is_completed_by_resume(capsys, tmp_path, model_dir, data):
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert _train(capsys, model_dir, data, out, "--steps", "2", "--save-every", "1", "--fisher", "none")[0] == 0
    expected = load_file(str(out / "final" / "model.safetensors"))
    shutil.rmtree(out / "final")  # killed after its last checkpoint, before final/
    (out / "metrics.json").unlink()
    code, stdout, err = _train(capsys, model_dir, data, out, "--steps", "2", "--save-every", "1", "--fisher", "none",
                               "--resume")
    assert code == 0, err
    assert "completed from" in stdout
    got = load_file(str(out / "final" / "model.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 2
    code, _, err = _train(capsys, model_dir, data, out, "--steps", "2", "--save-every", "1", "--fisher", "none",
                          "--resume")
    assert "the run is complete" in _one_line(err, code)


def test_b12_resume_notices_changed_data_and_model(capsys, tmp_path, model_dir, data):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    out = tmp_path / "run"
    assert _train(capsys, model, data, out, "--steps", "1", "--fisher", "none")[0] == 0
    with open(data, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"prompt": "S:9>", "response": "9"}) + "\n")
    code, _, err = _train(capsys, model, data, out, "--steps", "2", "--fisher", "none", "--resume")
    assert "the data" in _one_line(err, code) and "has changed" in err
    _jsonl(data, SFT_LINES)  # the same content again: resumable, even though the file was rewritten
    cfg = json.loads((model / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (model / "config.json").write_text(json.dumps(cfg))
    code, _, err = _train(capsys, model, data, out, "--steps", "2", "--fisher", "none", "--resume")
    assert "the model" in _one_line(err, code) and "has changed" in err


def test_b14_leftovers_of_killed_runs_are_cleaned(capsys, tmp_path, model_dir, data):
    out = tmp_path / "run"
    assert _train(capsys, model_dir, data, out, "--steps", "1", "--fisher", "none")[0] == 0
    pid = _dead_pid()
    stale = [out / f".final.{pid}.abc.tmp", out / "checkpoints" / f".step-000002.{pid}.x1.tmp",
             out / "checkpoints" / f".step-000000.{pid}.x2.del"]
    for p in stale:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"half")
    (out / f".metrics.json.{pid}.q.tmp").write_text("{")
    half = out / "checkpoints" / "step-000000"  # a prune killed halfway: state.json already gone
    half.mkdir()
    (half / "optimizer.pt").write_bytes(b"x")
    live = out / f".final.{os.getpid()}.live.tmp"  # a running process's temporary is left alone
    live.mkdir()
    code, _, err = _train(capsys, model_dir, data, out, "--steps", "2", "--fisher", "none", "--resume")
    assert code == 0, err
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000001", "step-000002"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["checkpoints", "final", "metrics.json", live.name])
    # score cleans its own kind beside --out
    (tmp_path / f".sout.{pid}.z.tmp").mkdir()
    assert run_cli(capsys, "score", data, "--model", model_dir, "--out", tmp_path / "sout", "--fisher", "none")[0] == 0
    assert not (tmp_path / f".sout.{pid}.z.tmp").exists()


def test_b18_resume_accepts_a_flag_equal_to_the_default(capsys, tmp_path, model_dir, data):
    out = tmp_path / "run"
    assert _train(capsys, model_dir, data, out, "--steps", "1", "--fisher", "none")[0] == 0
    code, _, err = _train(capsys, model_dir, data, out, "--steps", "2", "--fisher", "none", "--resume",
                          "--keep-ratio", "0.6")
    assert code == 0, err
    code, _, err = _train(capsys, model_dir, data, out, "--steps", "3", "--fisher", "none", "--resume",
                          "--check-finite", "--tracked-layers", "all", "--seed", "0", "--grad-clip", "1")
    assert code == 0, err
    code, _, err = _train(capsys, model_dir, data, out, "--steps", "4", "--fisher", "none", "--resume",
                          "--keep-ratio", "0.5")
    assert "--resume: alphatoken" in _one_line(err, code) and "0.5" in err


# ----------------------------------------------------------------------------------------- wrong results


@pytest.mark.parametrize("clip", ["-1", "0"])
def test_b5_grad_clip_must_be_positive(capsys, tmp_path, model_dir, data, clip):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"grad_clip: {clip}\n")
    code, _, err = _train(capsys, model_dir, data, tmp_path / "run", "--steps", "1", "--config", cfg)
    assert "grad_clip must be a finite number > 0" in _one_line(err, code) and not (tmp_path / "run").exists()
    code, _, err = _train(capsys, model_dir, data, tmp_path / "run", "--steps", "1", "--grad-clip", clip)
    assert "grad_clip must be a finite number > 0" in _one_line(err, code)


def test_b9_track_embeddings_with_a_fisher(capsys, tmp_path, model_dir, data):
    from alphatoken import Fisher

    cfg = tmp_path / "c.yaml"
    cfg.write_text("fisher: kfac\nfisher_batches: 1\nalphatoken:\n  track_embeddings: true\n")
    code, _, err = _train(capsys, model_dir, data, tmp_path / "run", "--steps", "1", "--config", cfg)
    assert code == 0, err
    assert "model.embed_tokens" in Fisher.load(str(tmp_path / "run" / "fisher.safetensors")).names()
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "score", data, "--model", model_dir, "--out", out, "--fisher", "diag",
                           "--track-embeddings", "--save-fisher", "--fisher-batches", "1")
    assert code == 0, err
    assert "model.embed_tokens" in Fisher.load(str(out / "fisher.safetensors")).names()


@pytest.mark.parametrize("pattern", ["no_such_module", "-1"])
def test_b10_tracked_layers_matching_nothing_is_an_error(capsys, tmp_path, model_dir, data, pattern):
    code, _, err = run_cli(capsys, "score", data, "--model", model_dir, "--out", tmp_path / "o", "--fisher", "kfac",
                           "--tracked-layers", pattern)
    line = _one_line(err, code)
    assert "tracked_layers" in line
    assert not (tmp_path / "o").exists()  # refused before the Fisher estimate


# ------------------------------------------------------------------------------------ exit codes, messages


def _nested(tmp_path):
    p = tmp_path / "deep.jsonl"
    p.write_text('{"prompt": "a", "response": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    return p


B13_CASES = {
    "seed_abc": (["train"], "seed: abc\n", [], "seed must be an integer"),
    "negative_lr": (["train"], "", ["--lr=-1e-3"], "lr must be a finite number > 0"),
    "yaml_negative_lr": (["train"], "lr: -0.1\n", [], "lr must be a finite number > 0"),
    "negative_weight_decay": (["train"], "weight_decay: -1\n", [], "weight_decay must be a finite number >= 0"),
    "nan_stability_weight": (["score"], None, ["--stability-weight", "nan"], "not a finite number"),
    "yaml_nan_stability": (["train"], "alphatoken:\n  stability_weight: .nan\n", [], "finite"),
    "bad_regex": (["score"], None, ["--tracked-layers", "layers.(0"], "not 'all', a block count or a valid regex"),
    "bad_reference_dtype": (["train"], "alphatoken:\n  reference_dtype: float8\n", [], "reference_dtype"),
    "string_bool": (["train"], "alphatoken:\n  check_finite: 'no'\n", [], "true or false"),
    "bool_keep_ratio": (["train"], "alphatoken:\n  keep_ratio: true\n", [], "not a boolean"),
    "fisher_batches_0": (["score"], None, ["--fisher-batches", "0"], "--fisher-batches must be >= 1"),
    "fisher_batches_neg": (["score"], None, ["--fisher-batches", "-2"], "--fisher-batches must be >= 1"),
    "beta_0": (["score"], None, ["--beta", "0"], "--beta must be a finite number > 0"),
    "deep_json": (["score"], None, [], "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(B13_CASES))
def test_b13_b19_bad_input_exits_2_before_any_work(capsys, tmp_path, model_dir, data, monkeypatch, case):
    """One line, exit 2, and nothing done: no model loaded, no Fisher estimated, no output folder."""
    import alphatoken.data as D

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(D, "load_model", no_load)
    command, yaml_text, flags, expect = B13_CASES[case]
    src = _nested(tmp_path) if case == "deep_json" else data
    out = tmp_path / "o"
    if command == ["score"]:
        argv = ["score", src, "--model", model_dir, "--out", out, *flags]
    else:
        argv = ["train", "--model", model_dir, "--data", src, "--out", out, *flags]
        if yaml_text:
            (tmp_path / "c.yaml").write_text(yaml_text)
            argv += ["--config", tmp_path / "c.yaml"]
    code, _, err = run_cli(capsys, *argv)
    assert expect in _one_line(err, code), err
    assert not out.exists()


def test_b17_full_disk_at_checkpoint_names_the_file(capsys, tmp_path, model_dir, data, monkeypatch):
    out = tmp_path / "run"
    real = torch.save

    def full_disk(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = _train(capsys, model_dir, data, out, "--steps", "1", "--fisher", "none")
    line = _one_line(err, code, 1)
    assert "step-000001" in line and "No space left on device" in line and "--resume" in line
    assert not (out / "checkpoints").exists() or not [p for p in (out / "checkpoints").iterdir()]


def test_b17_b21_damaged_checkpoint_and_fisher_files(capsys, tmp_path, model_dir, data):
    out = tmp_path / "run"
    assert _train(capsys, model_dir, data, out, "--steps", "1", "--fisher", "diag", "--fisher-batches", "1")[0] == 0
    ckpt = out / "checkpoints" / "step-000001"
    weights = ckpt / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x01  # one flipped bit in the last weight
    weights.write_bytes(bytes(raw))
    code, _, err = _train(capsys, model_dir, data, out, "--steps", "2", "--fisher", "diag", "--fisher-batches", "1",
                          "--resume")
    line = _one_line(err, code)
    assert str(weights) in line and "damaged checkpoint file" in line
    raw[-5] ^= 0x01
    weights.write_bytes(bytes(raw))
    fisher = out / "fisher.safetensors"
    good = fisher.read_bytes()
    flipped = bytearray(good)
    flipped[-3] ^= 0x10
    fisher.write_bytes(bytes(flipped))
    code, _, err = _train(capsys, model_dir, data, out, "--steps", "2", "--fisher", "diag", "--fisher-batches", "1",
                          "--resume")
    line = _one_line(err, code)
    assert str(fisher) in line and "damaged" in line
    fisher.write_bytes(good[: len(good) // 2])  # truncated
    code, _, err = _train(capsys, model_dir, data, out, "--steps", "2", "--fisher", "diag", "--fisher-batches", "1",
                          "--resume")
    assert str(fisher) in _one_line(err, code)
    fisher.write_bytes(good)
    code, _, err = _train(capsys, model_dir, data, out, "--steps", "2", "--fisher", "diag", "--fisher-batches", "1",
                          "--resume")
    assert code == 0, err


def test_b21_fisher_digest_and_b17_missing_kfac_factor(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from alphatoken import Fisher

    g = torch.Generator().manual_seed(7)
    f = Fisher("kfac", {"a": (torch.rand(3, generator=g), torch.rand(4, generator=g)),
                        "b": (torch.rand(2, generator=g), torch.rand(5, generator=g))})
    path = tmp_path / "f.safetensors"
    f.save(str(path))
    back = Fisher.load(str(path))
    assert all(torch.equal(back["a"][i], f["a"][i]) for i in range(2))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x04
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="damaged Fisher file"):
        Fisher.load(str(path))
    # a file without the b::f_in factor (written by hand, no digest): a message naming the file and the layer
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as fh:
        meta = {k: v for k, v in fh.metadata().items() if k != "sha256"}
    save_file({"a::f_out": f["a"][0], "a::f_in": f["a"][1], "b::f_out": f["b"][0]}, str(tmp_path / "g.safetensors"),
              metadata=meta)
    with pytest.raises(ValueError, match=r"g.safetensors: the kfac Fisher of layer 'b' lacks its f_in factor"):
        Fisher.load(str(tmp_path / "g.safetensors"))


def test_cleanup_touches_only_our_own_names(tmp_path):
    from alphatoken.cli.shared import clean_stale

    pid = _dead_pid()
    ours, theirs, live = tmp_path / f".out.{pid}.a.tmp", tmp_path / f".other.{pid}.b.tmp", tmp_path / f".out.{os.getpid()}.c.tmp"
    for p in (ours, theirs, live):
        p.mkdir()
    assert clean_stale(tmp_path, names=["out"]) == [ours.name]
    assert not ours.exists() and theirs.exists() and live.exists()
