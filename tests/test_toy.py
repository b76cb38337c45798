"""The toy world: tokenizer round-trip, tasks, collate, decoding, fine-tuning loop and the built-in model."""
import pytest
import torch

from alphatoken import toy
from alphatoken.toy.tasks import TASK_CODES


@pytest.fixture(scope="module")
def tokenizer():
    return toy.build_tokenizer()


def test_tokenizer_round_trip(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    text = "S:5281>sure,1258"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(text, add_special_tokens=False) == ids
    assert again.pad_token == "<pad>" and again.eos_token == "<eos>"


def test_tasks_are_correct_and_deterministic():
    for task in toy.RETENTION_TASKS + (toy.TARGET_TASK,):
        exs = toy.make_examples(task, 50, seed=3)
        assert exs == toy.make_examples(task, 50, seed=3)
        for ex in exs:
            body = ex.prompt[2:-1]
            assert ex.prompt.startswith(TASK_CODES[task] + ":") and ex.prompt.endswith(">")
            expected = {"add": lambda s: str(sum(map(int, s.split("+")))), "copy": lambda s: s,
                        "reverse": lambda s: s[::-1], "sort": lambda s: "".join(sorted(s))}[task](body)
            assert ex.answer == expected == ex.response and not ex.is_noisy


def test_target_noise_flags_and_clean_eval():
    data = toy.target_data(n_train=500, n_validation=32, n_eval=100, seed=1)
    assert 0.15 < data.noise_share < 0.6
    assert not any(ex.is_noisy for ex in data.validation + data.eval)
    assert not {ex.prompt for ex in data.train} & {ex.prompt for ex in data.eval + data.validation}
    noise = toy.TargetNoise()
    for ex in data.train:
        assert len(ex.noise) == len(ex.response)
        clean = [c for c, f in zip(ex.response, ex.noise) if not f]
        # unflagged characters sit where the answer has them (filler shifts by its length)
        offset = len(noise.filler) if ex.response.startswith(noise.filler) else 0
        assert all(ex.response[i] == ex.answer[i - offset] for i, f in enumerate(ex.noise) if not f)
        assert len(clean) <= len(ex.answer)
    assert toy.target_data(n_train=50, n_eval=100, seed=2).eval == data.eval  # eval set fixed across seeds
    assert all(not ex.is_noisy for ex in toy.target_data(n_train=100, seed=0, noise=toy.TargetNoise.clean()).train)


def test_collate_right_padding_and_labels(tokenizer):
    exs = toy.make_examples("sort", 3, seed=0, noise=toy.TargetNoise(filler_rate=1.0))
    batch = toy.collate(exs, tokenizer, return_noise=True)
    B, T = batch["input_ids"].shape
    for b, ex in enumerate(exs):
        n_prompt, n = 1 + len(ex.prompt), 1 + len(ex.prompt) + len(ex.response) + 1
        assert batch["input_ids"][b, 0] == tokenizer.bos_token_id
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)
        assert (batch["labels"][b, :n_prompt] == -100).all() and (batch["labels"][b, n:] == -100).all()
        assert batch["labels"][b, n - 1] == tokenizer.eos_token_id
        assert torch.equal(batch["labels"][b, n_prompt:n], batch["input_ids"][b, n_prompt:n])
        assert tokenizer.decode(batch["input_ids"][b, n_prompt:n - 1].tolist()) == ex.response
        assert batch["noise"][b, n_prompt:n - 1].tolist() == list(ex.noise)
        assert (batch["input_ids"][b, n:] == tokenizer.pad_token_id).all()
    assert batch["noise"].sum() >= 3 * len("sure,")


def test_greedy_decode_cache_matches_recompute_and_padding(tokenizer):
    model = toy.build_model(tokenizer, seed=0, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    exs = toy.make_examples("copy", 3, seed=0) + toy.make_examples("add", 3, seed=0)
    a = toy.greedy_decode(model, tokenizer, exs, max_new_tokens=5, use_cache=True)
    b = toy.greedy_decode(model, tokenizer, exs, max_new_tokens=5, use_cache=False)
    singles = [toy.greedy_decode(model, tokenizer, [ex], max_new_tokens=5)[0] for ex in exs]
    assert a == b == singles


def test_finetune_full_and_with_a_scorer(tokenizer):
    from alphatoken.config import AlphaTokenConfig
    from alphatoken.scorers import make_scorer

    model = toy.build_model(tokenizer, seed=0, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    data = toy.target_data(n_train=64, n_eval=16, seed=0)
    stats = toy.finetune(model, tokenizer, data.train, "full", steps=4, batch_size=8, lr=1e-3, seed=0)
    assert stats["tokens_trained"] == stats["response_tokens"] > 0 and len(stats["losses"]) == 4
    assert stats["keep_ratio"] == 1.0 and stats["noise_dropped_share"] == 0.0
    with make_scorer("loss_low", model, AlphaTokenConfig(keep_ratio=0.5)) as scorer:
        stats = toy.finetune(model, tokenizer, data.train, scorer, steps=4, batch_size=8, seed=1)
    assert 0.45 < stats["keep_ratio"] < 0.6 and stats["wall_time"] > 0
    with pytest.raises(ValueError, match="value_and_loss"):
        toy.finetune(model, tokenizer, data.train, "nope", steps=1)


def test_finetune_shows_a_bar_on_a_terminal_and_log_lines_otherwise(tokenizer, capsys, monkeypatch):
    model = toy.build_model(tokenizer, seed=0, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    data = toy.target_data(n_train=32, n_eval=8, seed=0)
    monkeypatch.setenv("ALPHATOKEN_PROGRESS", "1")
    toy.finetune(model, tokenizer, data.train, "full", steps=4, batch_size=8, seed=0, progress=True, log_every=2)
    out, err = capsys.readouterr()
    assert "fine-tune (full)" in err and "/4 [" in err and "step 2/4" not in out
    monkeypatch.setenv("ALPHATOKEN_PROGRESS", "0")
    toy.finetune(model, tokenizer, data.train, "full", steps=4, batch_size=8, seed=0, progress=True, log_every=2)
    out, err = capsys.readouterr()
    assert "fine-tune" not in err and "step 2/4" in out and "step 4/4" in out
    toy.finetune(model, tokenizer, data.train, "full", steps=4, batch_size=8, seed=0, progress=False, log_every=2)
    out, err = capsys.readouterr()
    assert out == "" and "fine-tune" not in err


def test_finetune_is_deterministic(tokenizer):
    data = toy.target_data(n_train=64, n_eval=16, seed=0)
    losses = []
    for _ in range(2):
        model = toy.build_model(tokenizer, seed=0, hidden_size=32, intermediate_size=64, num_layers=1,
                                num_heads=2)
        losses.append(toy.finetune(model, tokenizer, data.train, "full", steps=3, batch_size=8, seed=2)["losses"])
    assert losses[0] == losses[1]


@pytest.mark.skipif(not (toy.BUILTIN_DIR / "model.safetensors").exists(), reason="built-in model not built")
def test_builtin_model_is_small_and_retains_its_tasks():
    size = sum(p.stat().st_size for p in toy.BUILTIN_DIR.iterdir())
    assert size < 5 * 2**20
    model, tokenizer = toy.load_builtin()
    assert model.training and len(tokenizer) == model.config.vocab_size
    acc = toy.evaluate_tasks(model, tokenizer, toy.retention_eval_sets(n=50))
    assert min(acc.values()) >= 0.9, acc
    assert toy.exact_match(model, tokenizer, toy.target_data(n_train=1, n_eval=50).eval) < 0.2
