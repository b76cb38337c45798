"""DPO: with every token kept the loss equals TRL's DPOTrainer's; with a mask it equals a hand computation;
the values come from the DPO loss's own credits; an empty side is an error naming the example."""
import copy

import pytest
import torch
import torch.nn.functional as F

import alphatoken as at
from alphatoken.dpo import check_pairs, dpo_token_weights, masked_dpo_loss
from integration_helpers import tiny_llama, tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
PAIRS = [("ab", "cd e", "zz"), ("x", "yz1", "q 2"), ("hello", " w", "x yz"), ("12", "345 6", "7")]


def _trainers(tmp_path, cfg):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from alphatoken.integrations import AlphaTokenDPOTrainer

    ds = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                     use_cpu=True, bf16=False, beta=0.5, save_strategy="no")
    model, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    trl_tr = DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref), args=args, train_dataset=ds,
                        processing_class=tokenizer())
    ours = AlphaTokenDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds,
                                processing_class=tokenizer(), alphatoken=cfg)
    batch = next(iter(trl_tr.get_train_dataloader()))
    return trl_tr, ours, batch


def test_dpo_all_kept_equals_trl_and_masked_equals_hand(tmp_path):
    trl_tr, ours, batch = _trainers(tmp_path, at.AlphaTokenConfig(keep_ratio=1.0))
    trl_tr.model.train(), ours.model.train()
    want = trl_tr.compute_loss(trl_tr.model, dict(batch))
    got = ours.compute_loss(ours.model, dict(batch))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    want.backward(), got.backward()
    for (n, p), (_, q) in zip(trl_tr.model.named_parameters(), ours.model.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    assert ours._metrics["train"]["alphatoken/keep_ratio"][-1] == 1.0

    # a mask: the loss is -log σ(β(Σ_kept r_c − Σ_kept r_r)), by hand from plain forwards
    ours._at_valuer = at.AlphaToken(ours.model, at.AlphaTokenConfig(keep_ratio=0.5))
    got = ours.compute_loss(ours.model, dict(batch))
    keep = ours._at_valuer.last_values.mask
    assert 0 < keep.sum() < ours._at_valuer.last_values.response.sum()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        lp = [torch.log_softmax(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                                .float(), -1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
              for m in (ours.model, ours.ref_model)]
    r = (lp[0] - lp[1]) * keep[:, 1:]
    assert bool((keep[:, 1:] <= (labels[:, 1:] != -100)).all())
    B = r.shape[0] // 2
    h = r[:B].sum(1) - r[B:].sum(1)
    hand = -F.logsigmoid(0.5 * h).mean()
    torch.testing.assert_close(got.detach(), hand, rtol=1e-5, atol=1e-6)


def test_dpo_token_weights_are_the_loss_credits():
    torch.manual_seed(0)
    pol = torch.randn(4, 6, requires_grad=True)
    ref = torch.randn(4, 6)
    resp = torch.rand(4, 6) > 0.3
    resp[:, 0] = False
    resp[:, 1] = True
    loss = masked_dpo_loss(pol, ref, resp, beta=0.3).loss
    (g,) = torch.autograd.grad(loss, pol)
    w = dpo_token_weights(ref * resp, 0.3, resp)((pol * resp).detach())
    torch.testing.assert_close(w, -g * resp)  # w_t = ∂loss/∂ℓ_t = −∂loss/∂log π(y_t)


def test_empty_side_names_the_example(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig

    from alphatoken.integrations import AlphaTokenDPOTrainer

    ds = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b",
                                                                              "rejected": ""}])
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match="example 1: the rejected response is empty"):
        AlphaTokenDPOTrainer(model=tiny_llama(), ref_model=tiny_llama(), args=args, train_dataset=ds,
                             processing_class=tokenizer())
    labels = torch.tensor([[-100, 5, 6], [-100, 7, -100], [-100, -100, -100], [-100, 8, 9]])
    with pytest.raises(ValueError, match="pair 0 of the batch: the rejected response"):
        check_pairs(labels)


@pytest.mark.parametrize("beta", [0.0, -0.1, float("nan"), float("inf"), True, "0.1", None])
def test_bad_beta_is_refused_where_it_enters(tmp_path, beta):
    from datasets import Dataset
    from trl import DPOConfig

    from alphatoken.dpo import DPOMaskedLoss, check_beta, dpo_value_and_loss
    from alphatoken.integrations import AlphaTokenDPOTrainer

    with pytest.raises(ValueError, match="beta must be a (finite )?number > 0"):
        check_beta(beta)
    pol, ref, keep = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    for call in (lambda: masked_dpo_loss(pol, ref, keep, beta), lambda: dpo_token_weights(ref, beta),
                 lambda: DPOMaskedLoss(ref, beta), lambda: dpo_value_and_loss(None, {"labels": ref.long()}, ref, beta)):
        with pytest.raises(ValueError, match="beta must be"):
            call()
    if isinstance(beta, float):  # DPOConfig itself takes any float
        args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1, beta=beta)
        ds = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
        with pytest.raises(ValueError, match="DPOConfig.beta must be"):
            AlphaTokenDPOTrainer(model=tiny_llama(), ref_model=tiny_llama(), args=args, train_dataset=ds,
                                 processing_class=tokenizer())


def test_good_beta_passes():
    from alphatoken.dpo import check_beta

    assert check_beta(0.1) == 0.1 and check_beta(2) == 2.0
