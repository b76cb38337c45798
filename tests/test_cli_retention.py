"""--retention builtin|FILE for `alphatoken score` and `train` (DESIGN §3.8): the batch each form builds, the
values it gives against the library's valuer, a train run resumed exactly, and the errors."""
import json

import pytest
import torch

import alphatoken as at
from alphatoken.cli.retention import retention_batch
from alphatoken.cli.score import validation_batches
from alphatoken.data import collate, load_model, pad_id_of, read_jsonl, tokenize_records
from alphatoken.retention import GENERAL_PROMPTS, own_answers
from cli_helpers import CLEAN_LINES, SFT_LINES, _jsonl, make_model_dir, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:AlphaToken. fisher=None")

KEPT_LINES = [{"prompt": "C:xy>", "response": "xy"}, {"prompt": "R:ab>", "response": "ba"}]
PROMPT_LINES = [{"prompt": "C:pq>"}, {"prompt": "S:42>"}, {"prompt": "R:mn>"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def files(tmp_path):
    return {"data": _jsonl(tmp_path / "d.jsonl", SFT_LINES), "clean": _jsonl(tmp_path / "clean.jsonl", CLEAN_LINES),
            "kept": _jsonl(tmp_path / "kept.jsonl", KEPT_LINES),
            "prompts": _jsonl(tmp_path / "prompts.jsonl", PROMPT_LINES)}


def _equal_batches(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


def test_each_form_builds_its_batch(model_dir, files):
    model, tok = load_model(str(model_dir), device="cpu")
    pad = pad_id_of(tok)
    kw = dict(max_length=None, tokens=5, device="cpu")
    _equal_batches(retention_batch("builtin", model, tok, pad, **kw),
                   own_answers(model, tok, GENERAL_PROMPTS, max_new_tokens=5))
    prompts = [r["prompt"] for r in PROMPT_LINES]
    _equal_batches(retention_batch(str(files["prompts"]), model, tok, pad, **kw),
                   own_answers(model, tok, prompts, max_new_tokens=5))
    records = read_jsonl(files["kept"])
    _equal_batches(retention_batch(str(files["kept"]), model, tok, pad, **kw),
                   collate(tokenize_records(records, tok, "sft"), pad))


@pytest.mark.parametrize("spec", ["builtin", "kept", "prompts"])
def test_score_values_are_the_libraries_with_that_retention_batch(capsys, tmp_path, model_dir, files, spec):
    source = spec if spec == "builtin" else files[spec]
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "score", files["data"], "--model", model_dir, "--out", out, "--fisher", "none",
                           "--validation", files["clean"], "--retention", source, "--retention-tokens", "6",
                           "--retention-weight", "0.7", "--batch-size", len(SFT_LINES), "--keep-ratio", "0.5")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["retention"] == str(source) and summary["config"]["retention_weight"] == 0.7
    got = [json.loads(l) for l in (out / "values.jsonl").read_text().splitlines()]

    model, tok = load_model(str(model_dir), device="cpu")
    pad = pad_id_of(tok)
    examples = tokenize_records(read_jsonl(files["data"]), tok, "sft")
    val = validation_batches(files["clean"], tok, pad, max_length=None, batch_size=None, device="cpu")
    ret = retention_batch(str(source), model, tok, pad, max_length=None, tokens=6, device="cpu")
    cfg = at.AlphaTokenConfig(**{**summary["config"], "always_keep_token_ids": ()})
    valuer = at.AlphaToken(model, cfg, validation=val, retention=ret)
    alone = at.AlphaToken(model, cfg, validation=val).value(collate(examples, pad))
    want = valuer.value(collate(examples, pad))
    valuer.close()
    for b, row in enumerate(got):
        n = len(row["alphatoken_total"])
        assert row["alphatoken_total"] == pytest.approx(want.total[b, :n].tolist(), rel=1e-4, abs=1e-6)
    assert (want.total - alone.total).abs().max() > 1e-4  # the retention batch changed the values


def test_train_with_retention_resumes_exactly_and_checks_the_file(capsys, tmp_path, model_dir, files):
    from safetensors.torch import load_file

    common = ["--model", model_dir, "--data", files["data"], "--batch-size", "2", "--lr", "3e-3", "--fisher", "none",
              "--validation", files["clean"], "--retention", files["prompts"], "--save-every", "1"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_cli(capsys, "train", *common, "--out", whole, "--steps", "2")[0] == 0
    assert run_cli(capsys, "train", *common, "--out", split, "--steps", "1")[0] == 0
    code, _, err = run_cli(capsys, "train", *common, "--out", split, "--steps", "2", "--resume")
    assert code == 0, err
    a, b = (load_file(str(p / "final" / "model.safetensors")) for p in (whole, split))
    assert all(torch.equal(a[k], b[k]) for k in a)
    _jsonl(files["prompts"], PROMPT_LINES[:2])
    code, _, err = run_cli(capsys, "train", *common, "--out", split, "--steps", "3", "--resume")
    assert code == 2 and "the retention" in err and "has changed" in err


def test_retention_errors(capsys, tmp_path, model_dir, files):
    base = ["score", files["data"], "--model", model_dir, "--fisher", "none"]
    cases = [
        ([], "--validation FILE"),  # no validation target to add to
        (["--validation", files["clean"], "--target", "tuned"], "target is 'tuned'"),
        (["--validation", files["clean"], "--retention-tokens", "0"], "--retention-tokens must be"),
    ]
    for extra, message in cases:
        out = tmp_path / "o"
        code, _, err = run_cli(capsys, *base, "--out", out, "--retention", "builtin", *extra)
        assert code == 2 and message in err, err
        assert not out.exists()
    code, _, err = run_cli(capsys, *base, "--out", tmp_path / "o", "--validation", files["clean"], "--retention",
                           tmp_path / "missing.jsonl")
    assert code == 2 and "no such file" in err
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    code, _, err = run_cli(capsys, *base, "--out", tmp_path / "o", "--validation", files["clean"], "--retention",
                           pairs)
    assert code == 2 and "preference" in err
    code, _, err = run_cli(capsys, "train", "--model", model_dir, "--data", files["data"], "--out", tmp_path / "t",
                           "--retention", "builtin")
    assert code == 2 and "--validation" in err
