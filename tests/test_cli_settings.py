"""Every AlphaTokenConfig field reachable from `alphatoken score` / `train` / `demo` flags and the train YAML,
typed from the dataclass, with --help stating the defaults; --validation and --keep-eos end to end."""
import argparse
import dataclasses
import json
from typing import Literal, Optional

import pytest
import torch

from alphatoken.cli import build_parser
from alphatoken.cli.config_flags import add_config_flags, config_from_args, field_specs, show_default
from alphatoken.cli.train import _train_settings
from alphatoken.config import AlphaTokenConfig
from cli_helpers import CLEAN_LINES, SFT_LINES, _jsonl, make_model_dir, run_cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny_model"))


def _accepted(spec, value) -> bool:
    try:
        AlphaTokenConfig(**{spec.name: value})
        return True
    except (ValueError, TypeError):
        return False


def _other_value(spec):
    """A valid value different from the field's default, and how to write it on the command line (the first
    candidate the config accepts, so fields with ranges added later work too)."""
    if spec.kind == "bool":
        return (not spec.default), None
    if spec.kind in ("float", "int"):
        d = spec.default if spec.default is not None else 0
        cands = ([d + 0.5, d * 0.5, 0.5, 0.25, 2.0] if spec.kind == "float" else [d + 1, d - 1, 2, 1, 0])
        value = next(v for v in cands if v != spec.default and _accepted(spec, v))
        return value, str(value)
    if spec.name == "target":
        return "none", "none"
    if spec.choices:
        value = next(c for c in spec.choices if c != spec.default)
        return value, value
    if spec.kind == "tuple":
        return (2, 5), "2,5"
    if spec.kind == "str_or_int":
        return 1, "1"
    if spec.kind == "dtype":
        return torch.bfloat16, "bfloat16"
    if spec.kind == "device":
        return "cpu", "cpu"
    return "x", "x"


def _flag_args(spec, command):
    value, text = _other_value(spec)
    flag = spec.flag(command)
    if spec.kind == "bool":
        return value, [flag if value else "--no-" + flag[2:]]
    return value, [flag, text]


@pytest.mark.parametrize("command", ["score", "train"])
def test_every_config_field_has_a_flag(command, tmp_path):
    parser = build_parser()
    names = {f.name for f in dataclasses.fields(AlphaTokenConfig)}
    assert {s.name for s in field_specs()} == names
    base = ["score", "d.jsonl"] if command == "score" else ["train", "--data", "d.jsonl"]
    for spec in field_specs():
        value, argv = _flag_args(spec, command)
        args = parser.parse_args(base + argv)
        assert config_from_args(args) == {spec.name: value}, spec.name
    assert config_from_args(parser.parse_args(base)) == {}
    # --help names every flag and states its default
    sub = parser._subparsers._group_actions[0].choices[command]
    text = sub.format_help()
    for spec in field_specs():
        assert spec.flag(command) in text, spec.name
    by_dest = {a.dest: a for a in sub._actions}
    for spec in field_specs():
        assert f"(default: {show_default(spec.default)})" in by_dest[spec.dest].help, spec.name


def test_every_config_field_has_a_yaml_key(tmp_path):
    """Each field set under `alphatoken:` in the train YAML arrives typed (a dtype name as a dtype)."""
    import yaml

    data = _jsonl(tmp_path / "d.jsonl", SFT_LINES)
    parser = build_parser()
    for spec in field_specs():
        value, _ = _other_value(spec)
        yaml_value = str(value).replace("torch.", "") if spec.kind == "dtype" else (
            list(value) if isinstance(value, tuple) else value)
        path = tmp_path / f"{spec.name}.yaml"
        path.write_text(yaml.safe_dump({"data": str(data), "alphatoken": {spec.name: yaml_value}}))
        s = _train_settings(parser.parse_args(["train", "--config", str(path)]))
        expected = AlphaTokenConfig(**{spec.name: value}).to_dict()[spec.name]
        got = s["alphatoken"][spec.name]
        assert got == expected or (isinstance(got, (list, tuple)) and list(got) == list(expected)), spec.name
        assert got != AlphaTokenConfig().to_dict()[spec.name], spec.name  # the YAML value arrived


def test_a_new_config_field_gets_its_flag_without_code_changes():
    @dataclasses.dataclass
    class Future:
        """A config.

        new_knob: a knob added later.
        switch_me: turn it off.
        ids: a list of ids.
        dtype: a dtype,
            continued here.
        """

        new_knob: float = 0.25
        switch_me: bool = True
        ids: tuple = ()
        dtype: Optional[torch.dtype] = None
        mode: Literal["fast", "exact"] = "fast"
        cap: Optional[int] = None

    p = argparse.ArgumentParser()
    add_config_flags(p, "score", cls=Future)
    args = p.parse_args(["--new-knob", "0.5", "--no-switch-me", "--ids", "3,4", "--dtype", "torch.float16",
                         "--mode", "exact", "--cap", "7"])
    assert config_from_args(args, cls=Future) == {"new_knob": 0.5, "switch_me": False, "ids": (3, 4),
                                                  "dtype": torch.float16, "mode": "exact", "cap": 7}
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "slow"])
    helps = {a.dest: a.help for a in p._actions}
    assert helps["cfg_new_knob"] == "a knob added later (default: 0.25)"
    assert helps["cfg_dtype"] == "a dtype, continued here (default: none)"
    with pytest.raises(SystemExit):
        p.parse_args(["--new-knob", "nan"])


def test_demo_reaches_the_config_too(monkeypatch, capsys, tmp_path):
    """demo's flags reach toy.compare's config; --help states the demo's own defaults."""
    from alphatoken import toy

    seen = {}

    def fake_compare(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(toy, "compare", fake_compare)
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "d", "--steps", "1", "--no-normalize",
                           "--stability-weight", "2", "--tracked-layers", "1", "--quiet")
    assert code == 1 and "stop here" in err
    assert seen["config"] == {"normalize": False, "stability_weight": 2.0, "tracked_layers": 1}
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    helps = {a.dest: a.help for a in demo._actions}
    assert helps["cfg_normalize"].endswith("(default: off)") and helps["cfg_target"].endswith("(default: auto)")
    assert helps["cfg_combine"].endswith("(default: rank)") and helps["cfg_cosine"].endswith("(default: on)")
    assert "cfg_keep_ratio" not in helps  # demo has its own --keep-ratio (0.8)


def test_score_validation_target_and_keep_eos(capsys, tmp_path, model_dir):
    data = _jsonl(tmp_path / "d.jsonl", SFT_LINES)
    clean = _jsonl(tmp_path / "clean.jsonl", CLEAN_LINES)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "score", data, "--model", model_dir, "--out", out, "--fisher", "none",
                           "--validation", clean, "--keep-eos", "--keep-ratio", "0.3", "--stability-weight", "0.5",
                           "--causal-weight", "0.25", "--tracked-layers", "1", "--normalize")
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    cfg = summary["config"]
    assert cfg["target"] == "tuned" and cfg["normalize"] is True and cfg["tracked_layers"] == 1  # auto's choice
    assert cfg["stability_weight"] == 0.5 and cfg["causal_weight"] == 0.25
    assert cfg["always_keep_token_ids"] == [2]  # the toy tokenizer's <eos>
    rows = [json.loads(l) for l in (out / "values.jsonl").read_text().splitlines()]
    eos = [(r["alphatoken_keep"][i]) for r in rows for i, t in enumerate(r["tokens"])
           if t == "<eos>" and r["alphatoken_response"][i]]
    assert len(eos) == len(rows) and all(eos)  # every response's <eos> kept, at keep 0.3
    html = (out / "report.html").read_text()
    assert html.count('class="tok k f" style="--') == len(rows) and "always_keep_token_ids" in html
    # --validation with a contradicting target, or target validation without a file: exit 2 before work
    code, _, err = run_cli(capsys, "score", data, "--model", model_dir, "--out", tmp_path / "o2",
                           "--validation", clean, "--target", "batch")
    assert code == 2 and "--validation" in err and not (tmp_path / "o2").exists()
    code, _, err = run_cli(capsys, "score", data, "--model", model_dir, "--out", tmp_path / "o2", "--target",
                           "validation")
    assert code == 2 and "--validation FILE" in err


def test_select_within_dataset_independent_of_batching_as_documented(capsys, tmp_path, model_dir):
    """B11: with a fixed validation direction, normalize off and no Fisher (what --help promises), the masks and
    values do not depend on --batch-size; the help and summary.json say what does."""
    data = _jsonl(tmp_path / "d.jsonl", SFT_LINES * 2)
    clean = _jsonl(tmp_path / "clean.jsonl", CLEAN_LINES)
    results = []
    for bs in (1, 3):
        out = tmp_path / f"bs{bs}"
        code, _, err = run_cli(capsys, "score", data, "--model", model_dir, "--out", out, "--fisher", "none",
                               "--validation", clean, "--batch-size", bs, "--keep-ratio", "0.5", "--refresh", "1000",
                               "--combine", "linear")
        assert code == 0, err
        results.append([json.loads(l) for l in (out / "values.jsonl").read_text().splitlines()])
    a, b = results
    assert [r["alphatoken_keep"] for r in a] == [r["alphatoken_keep"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["alphatoken_total"] == pytest.approx(rb["alphatoken_total"], rel=1e-4, abs=1e-6)
    summary = json.loads((tmp_path / "bs1" / "summary.json").read_text())
    assert "target batch" in summary["batching"] and "--validation" in summary["batching"]
    help_text = build_parser()._subparsers._group_actions[0].choices["score"].format_help()
    assert "independent of batching" not in help_text and "--fisher none they do not" in " ".join(help_text.split())
    assert "--combine linear" in " ".join(help_text.split())


def test_yaml_types_are_checked(capsys, tmp_path, model_dir):
    """B8/B13 at the CLI's door: a YAML string is not a boolean; reference_dtype can be set from YAML."""
    data = _jsonl(tmp_path / "d.jsonl", SFT_LINES)
    parser = build_parser()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {data}\nalphatoken:\n  reference_dtype: bfloat16\n  always_keep_token_ids: [2]\n")
    s = _train_settings(parser.parse_args(["train", "--config", str(cfg)]))
    assert s["alphatoken"]["reference_dtype"] == "torch.bfloat16" and list(s["alphatoken"]["always_keep_token_ids"]) == [2]
    cfg.write_text(f"data: {data}\nalphatoken:\n  normalize: 'false'\n")
    code, _, err = run_cli(capsys, "train", "--config", cfg, "--model", model_dir, "--out", tmp_path / "r")
    assert code == 2 and "normalize 'false'" in err and "true or false" in err
    assert not (tmp_path / "r").exists()


def test_unknown_characters_are_a_one_line_warning(capsys, tmp_path, model_dir):
    data = _jsonl(tmp_path / "d.jsonl", SFT_LINES + [{"prompt": "S:4~2>", "response": "24"}])
    code, _, err = run_cli(capsys, "score", data, "--model", model_dir, "--out", tmp_path / "o", "--fisher", "none")
    assert code == 0, err
    warned = [l for l in err.splitlines() if "unknown token" in l]
    assert warned == [f"alphatoken: warning: {data}:5: the tokenizer maps '~' to its unknown token '<unk>'; those "
                      "tokens are valued and trained as unknown (further occurrences are not reported)"]
    # and with neither --validation nor a Fisher, the valuer says that every value is 0, on one line
    assert any(l.startswith("alphatoken: warning:") and "every value is 0" in l for l in err.splitlines())


def test_score_with_the_tuned_target(capsys, tmp_path, model_dir):
    """--target tuned takes the --validation file: a copy of the model is tuned on it (--tune-steps, --tune-lr)."""
    data = _jsonl(tmp_path / "d.jsonl", SFT_LINES)
    clean = _jsonl(tmp_path / "clean.jsonl", CLEAN_LINES)
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "score", data, "--model", model_dir, "--out", out, "--fisher", "none",
                           "--validation", clean, "--target", "tuned", "--tune-steps", "3", "--tune-lr", "0.01")
    assert code == 0, err
    cfg = json.loads((out / "summary.json").read_text())["config"]
    assert cfg["target"] == "tuned" and cfg["tune_steps"] == 3 and cfg["tune_lr"] == 0.01
    rows = [json.loads(l) for l in (out / "values.jsonl").read_text().splitlines()]
    adaptation = [a for r in rows for a, resp in zip(r["alphatoken_adaptation"], r["alphatoken_response"]) if resp]
    assert any(a != 0 for a in adaptation)  # the tuned copy moved: U = θ − θ_val is not 0
    code, _, err = run_cli(capsys, "score", data, "--model", model_dir, "--out", tmp_path / "o2", "--target", "tuned")
    assert code == 2 and "--validation FILE" in err


def test_train_tunes_the_copy_at_its_lr(capsys, tmp_path, model_dir, monkeypatch):
    """`train --validation` (the tuned target) tunes the copy at the run's --lr: the optimizer goes to the valuer."""
    import alphatoken.cli.train as train_cli

    built = []

    def recording(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    real = train_cli.new_valuer
    monkeypatch.setattr(train_cli, "new_valuer", recording)
    data = _jsonl(tmp_path / "d.jsonl", SFT_LINES)
    clean = _jsonl(tmp_path / "clean.jsonl", CLEAN_LINES)
    code, _, err = run_cli(capsys, "train", "--model", model_dir, "--data", data, "--validation", clean, "--out",
                           tmp_path / "run", "--steps", "1", "--batch-size", "2", "--lr", "0.003", "--fisher", "none",
                           "--tune-steps", "2", "--quiet")
    assert code == 0, err
    assert built[0].cfg.target == "tuned" and built[0].cfg.tune_lr == 0.003
