"""Baseline scorers: values equal a hand computation on a tiny random model; masks keep the expected count."""
import math

import pytest
import torch

from alphatoken.config import AlphaTokenConfig
from alphatoken.scorers import (EntropyScorer, ExcessLossScorer, LossScorer, RandomScorer, make_scorer,
                                token_entropies, token_losses)
from alphatoken.values import TokenValues


def tiny_model(seed, vocab=23):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def random_batch(seed, B=3, T=11, vocab=23):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    prompt = [2, 4, 3]
    lengths = [T, T - 2, T - 4]
    mask = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        labels[b, :prompt[b]] = -100
        labels[b, lengths[b]:] = -100
        mask[b, :lengths[b]] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hand_loss_entropy(model, batch):
    """ℓ_t and H_t by explicit float64 loops over response positions."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    B, T = batch["labels"].shape
    loss = torch.zeros(B, T, dtype=torch.float64)
    ent = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(1, T):
            y = int(batch["labels"][b, t])
            if y == -100:
                continue
            z = logits[b, t - 1]
            logz = math.log(sum(math.exp(v) for v in z.tolist()))
            p = [math.exp(v - logz) for v in z.tolist()]
            loss[b, t] = logz - float(z[y])
            ent[b, t] = -sum(pi * math.log(pi) for pi in p)
    return loss, ent


def expected_kept(batch, keep):
    n = int((batch["labels"][:, 1:] != -100).sum())
    return math.ceil(keep * n - 1e-9)


@pytest.mark.parametrize("keep", [0.6, 0.25])
def test_loss_and_entropy_scorers_match_hand_computation(keep):
    model = tiny_model(0)
    batch = random_batch(1)
    loss, ent = hand_loss_entropy(model, batch)
    cfg = AlphaTokenConfig(keep_ratio=keep, min_keep_per_sequence=0)  # pure top-k, so the order check holds
    resp = batch["labels"] != -100
    for scorer, expected in [(LossScorer(model, cfg, mode="low"), -loss), (LossScorer(model, cfg, mode="high"), loss),
                             (EntropyScorer(model, cfg), ent)]:
        with scorer:
            tv = scorer.value(batch)
        assert isinstance(tv, TokenValues)
        torch.testing.assert_close(tv.total.double(), expected * resp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tv.total, tv.adaptation)
        torch.testing.assert_close(tv.total, tv.direct + tv.causal)
        assert int(tv.mask.sum()) == expected_kept(batch, keep)
        assert not bool((tv.mask & ~resp).any())
        # kept tokens are the top by score: the lowest kept score >= the highest dropped one
        kept, dropped = tv.total[tv.mask], tv.total[resp & ~tv.mask]
        assert float(kept.min()) >= float(dropped.max())


def test_excess_loss_is_model_minus_reference():
    model, ref = tiny_model(0), tiny_model(5)
    batch = random_batch(2)
    l_model, _ = hand_loss_entropy(model, batch)
    l_ref, _ = hand_loss_entropy(ref, batch)
    with ExcessLossScorer(model, AlphaTokenConfig(keep_ratio=0.5), reference=ref) as scorer:
        tv = scorer.value(batch)
    torch.testing.assert_close(tv.total.double(), (l_model - l_ref) * (batch["labels"] != -100), atol=1e-5, rtol=1e-5)
    assert int(tv.mask.sum()) == expected_kept(batch, 0.5)


def test_excess_loss_default_reference_is_a_snapshot():
    model = tiny_model(0)
    batch = random_batch(3)
    scorer = make_scorer("rho1", model, AlphaTokenConfig(keep_ratio=0.6))
    assert torch.count_nonzero(scorer.value(batch).total) == 0  # at θ₀ the excess loss is 0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert torch.count_nonzero(scorer.value(batch).total) > 0
    assert all(not p.requires_grad for p in scorer.reference.parameters())


def test_random_scorer_is_seeded_and_keeps_count():
    model = tiny_model(0)
    batch = random_batch(4)
    a = RandomScorer(model, AlphaTokenConfig(keep_ratio=0.6), seed=7).value(batch)
    b = RandomScorer(model, AlphaTokenConfig(keep_ratio=0.6), seed=7).value(batch)
    c = RandomScorer(model, AlphaTokenConfig(keep_ratio=0.6), seed=8).value(batch)
    assert torch.equal(a.mask, b.mask) and not torch.equal(a.total, c.total)
    assert int(a.mask.sum()) == expected_kept(batch, 0.6)


@pytest.mark.parametrize("name", ["random", "loss_low", "loss_high", "entropy", "excess_loss", "grad_norm_low"])
def test_value_and_loss_is_masked_mean_ce(name):
    model = tiny_model(0).train()
    batch = random_batch(5)
    with make_scorer(name, model, AlphaTokenConfig(keep_ratio=0.5), seed=1) as scorer:
        loss = scorer.value_and_loss(batch)
        tv = scorer.last_values
    kept_loss, _ = hand_loss_entropy(model, batch)
    expected = kept_loss[tv.mask].mean()
    assert abs(float(loss.detach()) - float(expected)) < 1e-5
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)


def test_sequence_selection_and_unknown_name():
    model = tiny_model(0)
    batch = random_batch(6)
    tv = LossScorer(model, AlphaTokenConfig(keep_ratio=0.5, selection="sequence"), mode="high").value(batch)
    resp = batch["labels"] != -100
    for b in range(batch["labels"].shape[0]):
        assert int(tv.mask[b].sum()) == math.ceil(0.5 * int(resp[b, 1:].sum()) - 1e-9)
    with pytest.raises(ValueError, match="unknown scorer"):
        make_scorer("nope", model)


def test_helpers_zero_outside_response():
    from alphatoken.tokens import token_error_norms

    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 1, 2, -100, -100], [-100, -100, 3, 4, 5]])
    assert token_losses(logits, labels)[labels == -100].abs().sum() == 0
    assert token_entropies(logits, labels)[labels == -100].abs().sum() == 0
    norms = token_error_norms(logits, labels)
    assert norms[labels == -100].abs().sum() == 0
    for b, t in (labels != -100).nonzero().tolist():  # ‖softmax − one-hot‖ written out, float64
        p = torch.softmax(logits[b, t - 1].double(), -1)
        assert abs(float(norms[b, t]) - float((p - torch.eye(7, dtype=torch.float64)[labels[b, t]]).norm())) < 1e-6


def _left_padded(batch):
    """The same sequences with their padding moved to the left (labels and mask moved with them)."""
    out = {k: torch.empty_like(v) for k, v in batch.items()}
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
            row = batch[key][b]
            out[key][b] = torch.cat([row.new_full((row.numel() - n,), pad), row[:n]])
    return out


@pytest.mark.parametrize("name", ["loss_low", "entropy", "excess_loss", "grad_norm_low"])
def test_left_and_right_padding_get_the_same_values(name):
    """Left-padded sequences get their position_ids from the attention mask (alphatoken.batch.model_inputs), so a
    scorer values them as the right-padded ones (the unpadded sequences)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(9)  # learned absolute positions: a shifted position changes the logits (RoPE would not)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=23, n_embd=16, n_layer=1, n_head=2, n_positions=32)).eval()
    right = random_batch(10)
    left = _left_padded(right)
    scorer = make_scorer(name, model, AlphaTokenConfig(keep_ratio=0.5))
    tv_right, tv_left = scorer.value(right), scorer.value(left)
    for b in range(right["input_ids"].shape[0]):
        n = int(right["attention_mask"][b].sum())
        T = right["input_ids"].shape[1]
        torch.testing.assert_close(tv_left.total[b, T - n:], tv_right.total[b, :n], rtol=1e-5, atol=1e-5)
        assert torch.equal(tv_left.response[b, T - n:], tv_right.response[b, :n])


def test_grad_norm_scorer_is_the_norm_of_each_tokens_own_head_gradient():
    """grad_norm_low = −‖∇_{W_head} ℓ_t‖, each token's head gradient from its own backward pass (float64)."""
    from alphatoken.scorers import GradNormScorer
    from brute import head_token_gradients

    model = tiny_model(3).double()
    batch = random_batch(11)
    scorer = GradNormScorer(model, AlphaTokenConfig(keep_ratio=0.6))
    tv = scorer.value(batch)
    grads, b, t = head_token_gradients(model, batch, "lm_head")
    expected = -grads.flatten(1).norm(dim=1)
    torch.testing.assert_close(tv.total[b, t].double(), expected, rtol=1e-5, atol=1e-6)
    assert tv.total[~tv.response].abs().sum() == 0
    assert int(tv.mask.sum()) == expected_kept(batch, 0.6)
    assert not model.lm_head._forward_pre_hooks  # the hook lives for the scorer's own forward only
    assert make_scorer("grand", model).name == "grad_norm_low"

    class Wrapped(torch.nn.Module):  # a DDP-style wrapper: `.module`, no get_output_embeddings of its own
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    wrapped = GradNormScorer(Wrapped(model), AlphaTokenConfig(keep_ratio=0.6)).value(batch)
    assert torch.equal(wrapped.total, tv.total)


def test_grad_norm_scorer_refuses_a_model_without_a_linear_head():
    from alphatoken.scorers import GradNormScorer

    class NoHead(torch.nn.Module):
        def get_output_embeddings(self):
            return None

    with pytest.raises(ValueError, match=r"linear output head: NoHead\.get_output_embeddings\(\) returned None"):
        GradNormScorer(NoHead())  # the valuer's own head check (layers.find_head), message and all
