"""The real fine-tune harness (benchmarks/quality/real_finetune.py): the noise oracle and the displacement."""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))

import alphatoken as at  # noqa: E402
from alphatoken.losses import IGNORE_INDEX  # noqa: E402


class _Recorder(torch.nn.Module):
    """Stands in for the model: returns the labels it was called with as `.loss`'s holder."""

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        import types

        self.labels = labels
        return types.SimpleNamespace(loss=torch.zeros(()))


def _batch(g, eos=7):
    labels = torch.randint(10, 50, (4, 12), generator=g)
    labels[:, :3] = IGNORE_INDEX  # prompts
    labels[1, 9:] = IGNORE_INDEX  # padding
    labels[0, 11] = labels[2, 11] = eos
    noise = (torch.rand(4, 12, generator=g) < 0.35) & (labels != IGNORE_INDEX) & (labels != eos)
    return {"input_ids": labels.clamp(min=0), "labels": labels}, noise


def test_the_unbudgeted_oracle_drops_exactly_the_noise_and_keeps_eos():
    from real_finetune import NoiseOracle

    g = torch.Generator().manual_seed(3)
    cfg = at.AlphaTokenConfig(keep_ratio=0.8, always_keep_token_ids=(7,))
    model = _Recorder()
    oracle = NoiseOracle(model, cfg, budget=False, seed=0)
    for _ in range(5):
        batch, noise = _batch(g)
        noise[0, 11] = True  # a flagged <eos> is kept all the same
        oracle.noise = noise
        oracle.value_and_loss(batch)
        response = batch["labels"] != IGNORE_INDEX
        expected = response & (~noise | (batch["labels"] == 7))
        assert torch.equal(oracle.last_values.mask, expected)
        assert torch.equal(model.labels, batch["labels"].masked_fill(~expected, IGNORE_INDEX))


def test_the_budgeted_oracle_keeps_the_ratio_and_drops_noise_before_clean():
    from real_finetune import NoiseOracle

    g = torch.Generator().manual_seed(4)
    cfg = at.AlphaTokenConfig(keep_ratio=0.8, always_keep_token_ids=(7,))
    oracle = NoiseOracle(_Recorder(), cfg, budget=True, seed=1)
    for _ in range(10):
        batch, noise = _batch(g)
        oracle.noise = noise
        oracle.value_and_loss(batch)
        mask = oracle.last_values.mask
        response = batch["labels"] != IGNORE_INDEX
        assert not (mask & ~response).any()
        assert int(mask.sum()) == math.ceil(0.8 * int(response.sum()) - 1e-9)
        assert mask[batch["labels"] == 7].all()
        n_drop = int((response & ~mask).sum())
        n_noise = int((noise & response).sum())
        # noise goes first: every dropped token is noise while there is noise left, and clean ones only after
        assert int((noise & ~mask & response).sum()) == min(n_drop, n_noise)


def test_displacement_is_the_norm_of_the_trained_weights_move_only():
    import copy

    from real_finetune import displacement

    g = torch.Generator().manual_seed(8)
    base = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    model = copy.deepcopy(base)
    model[0].requires_grad_(False)  # frozen: its move does not count
    deltas = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            deltas[name] = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.add_(deltas[name].float())
    moved = {n: p.detach().double() - dict(base.named_parameters())[n].detach().double()
             for n, p in model.named_parameters()}
    expected = sum(float(moved[n].pow(2).sum()) for n in ("1.weight", "1.bias")) ** 0.5
    assert abs(displacement(model, base) - expected) < 1e-9
    assert expected > 0


def test_the_filler_first_oracle_drops_the_leading_noise_before_other_noise():
    from real_finetune import NoiseOracle, leading_noise

    g = torch.Generator().manual_seed(12)
    cfg = at.AlphaTokenConfig(keep_ratio=0.8, always_keep_token_ids=(7,))
    oracle = NoiseOracle(_Recorder(), cfg, budget=True, seed=2, filler_first=True)
    for _ in range(10):
        batch, noise = _batch(g)
        response = batch["labels"] != IGNORE_INDEX
        noise[:2, 3:6] = True  # a filler in front of two responses
        noise &= response
        # brute force: the leading run of noise of each response
        filler = torch.zeros_like(noise)
        for b in range(noise.shape[0]):
            for t in range(noise.shape[1]):
                if response[b, t]:
                    if not noise[b, t]:
                        break
                    filler[b, t] = True
        assert torch.equal(leading_noise(noise, response), filler)
        oracle.noise = noise
        oracle.value_and_loss(batch)
        mask = oracle.last_values.mask
        assert int(mask.sum()) == math.ceil(0.8 * int(response.sum()) - 1e-9)
        dropped = response & ~mask
        n_drop = int(dropped.sum())
        assert int((filler & dropped).sum()) == min(n_drop, int(filler.sum()))  # the filler goes first
        assert int((noise & dropped).sum()) == min(n_drop, int(noise.sum()))  # then the rest of the noise


def test_set_overrides_parse_numbers_flags_names_and_inf_into_a_valid_config():
    from real_finetune import parse_overrides

    got = parse_overrides(["loss_gap_floor=inf", "loss_gap_margin=0.1", "cosine=false", "target=validation",
                           "keep_ratio=0.6", "tune_steps=12", "loss_gap_floor=3"])
    assert got == {"loss_gap_floor": 3, "loss_gap_margin": 0.1, "cosine": False, "target": "validation",
                   "keep_ratio": 0.6, "tune_steps": 12}
    assert type(got["tune_steps"]) is int  # a whole-number field is refused as a float
    cfg = at.AlphaTokenConfig(**got)  # the veto and a 3-nat floor together: a config the library accepts
    assert cfg.loss_gap_floor == 3.0 and cfg.loss_gap_margin == 0.1 and cfg.tune_steps == 12
    assert parse_overrides(["loss_gap_floor=inf"]) == {"loss_gap_floor": math.inf}


def test_exact_matches_mark_each_prompt_and_their_share_is_the_exact_match(monkeypatch):
    from alphatoken import realtasks as R

    examples = R.task_data("reverse", n_train=1, n_eval=7).eval
    rng = torch.Generator().manual_seed(5)
    right = (torch.rand(len(examples), generator=rng) < 0.5).tolist()
    right[0], right[1] = True, False  # both outcomes occur
    answers = [ex.answer if ok else ex.answer + "," for ex, ok in zip(examples, right)]
    monkeypatch.setattr(R, "generate", lambda model, tokenizer, prompts: answers)
    assert R.exact_matches(None, None, examples) == right
    assert R.exact_match(None, None, examples) == sum(right) / len(right)
    # a larger eval set starts with the smaller one (so a row's first n digits read the n-prompt set)
    assert R.task_data("reverse", n_train=1, n_eval=12).eval[:7] == examples
