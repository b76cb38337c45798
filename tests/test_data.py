"""alphatoken.data: JSONL reading with file:line errors, tokenizing, batching, all-or-nothing outputs."""
import json
import os

import pytest
import torch

from alphatoken.data import (atomic_dir, atomic_output, collate, collate_dpo, detect_kind, ensure_output_dir,
                             load_model, read_jsonl, split_pairs, tokenize_pair, tokenize_records)
from alphatoken.errors import UserError
from alphatoken.toy import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return p


def test_read_and_detect(tmp_path):
    p = _write(tmp_path, ['{"prompt": "a", "response": "b"}', "", '{"prompt": "c", "completion": "d", "x": 1}'])
    recs = read_jsonl(p)
    assert [r.line for r in recs] == [1, 3]
    assert detect_kind(recs) == "sft"
    p = _write(tmp_path, ['{"prompt": "a", "chosen": "b", "rejected": "c"}'], "p.jsonl")
    assert detect_kind(read_jsonl(p)) == "dpo"


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": '], ":2: not valid JSON"),
    (['[1, 2]'], ":1: expected a JSON object"),
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a"}'], ":2: missing field 'response'"),
    (['{"prompt": "a", "chosen": "b"}'], ":1: missing field 'rejected'"),
    (['{"prompt": "a", "response": 3}'], ":1: field 'response' must be a string"),
    ([], "no records"),
])
def test_bad_lines(tmp_path, lines, message):
    p = _write(tmp_path, lines)
    with pytest.raises(UserError, match=message) as err:
        detect_kind(read_jsonl(p))
    assert "\n" not in str(err.value)
    assert str(p) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="is a directory"):
        read_jsonl(tmp_path)


def test_tokenize_pair_labels(tok):
    ex = tokenize_pair(tok, "S:31>", "13")
    ids = ex["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert ex["labels"] == [-100] * ex["prompt_length"] + ids[ex["prompt_length"]:]
    assert tok.decode(ids[ex["prompt_length"]:-1]) == "13"
    assert tokenize_pair(tok, "S:31>", "13", add_eos=False)["input_ids"][-1] != tok.eos_token_id


def test_empty_response_and_truncation(tok, tmp_path):
    p = _write(tmp_path, ['{"prompt": "S:1>", "response": "1"}', '{"prompt": "S:1>", "response": ""}'])
    with pytest.raises(UserError, match=r"d.jsonl:2: response '' tokenizes to nothing"):
        tokenize_records(read_jsonl(p), tok)
    with pytest.raises(UserError, match="max_length"):
        tokenize_pair(tok, "S:123456>", "1", max_length=4)
    # an empty prompt gets the BOS token so the first response token can be valued
    ex = tokenize_pair(tok, "", "12")
    assert ex["prompt_length"] >= 1 and ex["labels"][0] == -100


def test_collate_and_pairs(tok, tmp_path):
    p = _write(tmp_path, ['{"prompt": "S:21>", "chosen": "12", "rejected": "sure,12"}',
                          '{"prompt": "S:3>", "chosen": "3", "rejected": "4"}'])
    exs = tokenize_records(read_jsonl(p), tok)
    b = collate_dpo(exs, pad_id=tok.pad_token_id)
    assert b["input_ids"].shape[0] == 4
    assert torch.equal(b["input_ids"][0, : len(exs[0]["chosen_input_ids"])], torch.tensor(exs[0]["chosen_input_ids"]))
    assert torch.equal(b["input_ids"][2, : len(exs[0]["rejected_input_ids"])],
                       torch.tensor(exs[0]["rejected_input_ids"]))
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    rows = split_pairs(exs)
    assert [r["part"] for r in rows] == ["chosen", "rejected"] * 2
    sft = collate(rows, pad_id=0)
    assert sft["input_ids"].shape[0] == 4


def test_atomic_output_all_or_nothing(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as fh:
            fh.write("half")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with atomic_output(target) as fh:
        json.dump({"a": 1}, fh)
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["out.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # like open(), not mkstemp's 0600


def test_atomic_dir(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "x").write_text("1")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with atomic_dir(target) as d:
        (d / "x").write_text("1")
    with atomic_dir(target) as d:  # replaces the old one whole
        (d / "y").write_text("2")
    assert sorted(os.listdir(target)) == ["y"]
    assert os.listdir(tmp_path) == ["ckpt"]


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write output"):
        ensure_output_dir(blocker / "out")
    assert ensure_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert sorted(os.listdir(tmp_path)) == ["file"]  # checked, nothing created
    ensure_output_dir(tmp_path / "a" / "b", create=True)
    assert (tmp_path / "a" / "b").is_dir()


def test_model_dir_errors(tmp_path):
    with pytest.raises(UserError, match="no such model directory"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path))


def test_toy_tokenizer_warns_once_naming_unknown_characters(tmp_path):
    import warnings

    tok = build_tokenizer()  # a fresh tokenizer: nothing reported yet
    with pytest.warns(UserWarning, match=r"no token for 'é', '!': mapped to <unk>"):
        ids = tok("S:1é>!")["input_ids"]
    assert ids.count(tok.unk_token_id) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same characters again: silent; known ones: silent
        tok("é!é"), tok("S:12>")
    with pytest.warns(UserWarning, match=r"no token for 'ü'"):
        tok(["ab", "üa"])


def test_unknown_characters_named_with_file_and_line_for_any_tokenizer(tmp_path):
    """Through the CLI's reader a tokenizer loaded from disk (no toy subclass) still names the characters."""
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(tmp_path / "tok")
    plain = AutoTokenizer.from_pretrained(tmp_path / "tok")
    p = _write(tmp_path, ['{"prompt": "S:1>", "response": "1"}', '{"prompt": "S:2>", "response": "2~"}'])
    with pytest.warns(UserWarning, match=r"d.jsonl:2: the tokenizer maps '~' to its unknown token"):
        tokenize_records(read_jsonl(p), plain)


def test_read_deeply_nested_json_is_a_user_error(tmp_path):
    p = tmp_path / "deep.jsonl"
    p.write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "response": "b"}\n')
    with pytest.raises(UserError, match=r"deep.jsonl:1: JSON nested too deeply"):
        read_jsonl(p)
