"""TRL's usual metrics next to AlphaToken's: the same names, computed over the kept tokens. With keep_ratio=1.0
they equal TRL's own trainers' figures; with a mask they equal TRL's computation on the masked labels (SFT "ahead"
runs TRL's own code) or a hand computation over the kept tokens (DPO)."""

import pytest
import torch

import alphatoken as at
from alphatoken.integrations.metrics import token_sums
from integration_helpers import tiny_llama, tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
PAIRS = [("ab", "cd e", "zz"), ("x", "yz1", "q 2"), ("hello", " w", "x yz"), ("12", "345 6", "7")]
SFT = [("ab", "cd e"), ("x", "yz1"), ("hello", " w"), ("12", "345 6")]
DPO_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy", "num_tokens")


def test_token_sums_against_float64_brute_force():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[:, :2] = -100
    labels[0, 4] = int(logits[0, 3].argmax())  # a few top-1 hits for sure
    labels[2, 6] = int(logits[2, 5].argmax())
    keep = torch.rand(3, 7, generator=g) > 0.3
    keep[0, 4] = keep[2, 6] = True
    ent = hits = mean = n = 0.0
    for b in range(3):
        for t in range(1, 7):
            if keep[b, t] and labels[b, t] != -100:
                z = logits[b, t - 1].double()
                p = torch.softmax(z, -1)
                ent += float(-(p * p.log()).sum())
                hits += float(int(z.argmax()) == int(labels[b, t]))
                mean += float(z.mean())
                n += 1
    got = token_sums(logits, keep, labels)
    torch.testing.assert_close(got, torch.tensor([ent, hits, mean, n], dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert hits >= 2


def _sft(tmp_path, cls, cfg=None, **kw):
    from datasets import Dataset
    from trl import SFTConfig

    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     max_steps=1, learning_rate=0.0, max_grad_norm=0.0, logging_steps=1, report_to=[], use_cpu=True,
                     save_strategy="no", seed=0, lr_scheduler_type="constant", bf16=False)
    ds = Dataset.from_list([{"prompt": p, "completion": c} for p, c in SFT])
    extra = {} if cfg is None else {"alphatoken": cfg, **kw}
    trainer = cls(model=tiny_llama(), args=args, train_dataset=ds, processing_class=tokenizer(), **extra)
    trainer.train()
    return trainer.state.log_history[0]


def test_sft_trainer_logs_trl_metrics_over_kept_tokens(tmp_path):
    from trl import SFTTrainer

    from alphatoken.integrations import AlphaTokenSFTTrainer

    plain = _sft(tmp_path, SFTTrainer)
    full = _sft(tmp_path, AlphaTokenSFTTrainer, at.AlphaTokenConfig(keep_ratio=1.0))
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert full[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-7), key
    assert full["alphatoken/keep_ratio"] == 1.0
    # with a mask: the online mode's figures equal TRL's own computation on the masked labels ("ahead")
    cfg = at.AlphaTokenConfig(keep_ratio=0.5)
    online = _sft(tmp_path, AlphaTokenSFTTrainer, cfg, alphatoken_mode="online")
    ahead = _sft(tmp_path, AlphaTokenSFTTrainer, cfg, alphatoken_mode="ahead")
    assert online["alphatoken/keep_ratio"] < 0.8
    assert online["alphatoken/keep_ratio"] == pytest.approx(ahead["alphatoken/keep_ratio"])
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert online[key] == pytest.approx(ahead[key], rel=1e-5, abs=1e-7), key
    assert online["entropy"] != pytest.approx(plain["entropy"], rel=1e-6)  # over fewer tokens: a different mean


def _dpo(tmp_path, cls, **kw):
    from datasets import Dataset
    from trl import DPOConfig

    ds = Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to=[],
                     logging_steps=1, use_cpu=True, bf16=False, beta=0.5, save_strategy="no", learning_rate=0.0)
    trainer = cls(model=tiny_llama(seed=0), ref_model=tiny_llama(seed=1), args=args, train_dataset=ds,
                  processing_class=tokenizer(), **kw)
    trainer.train()
    return trainer, trainer.state.log_history[0]


def test_dpo_trainer_logs_trl_metrics_over_kept_tokens(tmp_path):
    from trl import DPOTrainer

    from alphatoken.integrations import AlphaTokenDPOTrainer

    trl_tr, plain = _dpo(tmp_path, DPOTrainer)
    _, full = _dpo(tmp_path, AlphaTokenDPOTrainer, alphatoken=at.AlphaTokenConfig(keep_ratio=1.0))
    for key in DPO_KEYS:
        assert full[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-6), key
        if key.startswith(("rewards/", "logps/")):
            assert full[f"alphatoken/all_tokens/{key}"] == pytest.approx(plain[key], rel=1e-5, abs=1e-6), key

    # with a mask: the TRL names carry the kept-token sums (by hand), the all_tokens names still TRL's figures
    ours, masked = _dpo(tmp_path, AlphaTokenDPOTrainer, alphatoken=at.AlphaTokenConfig(keep_ratio=0.5))
    keep = ours.alphatoken_valuer.last_values.mask
    batch = next(iter(trl_tr.get_train_dataloader()))
    assert 0 < int(keep.sum()) < int(batch["completion_mask"][:, 1:].sum())
    with torch.no_grad():
        lp = [torch.log_softmax(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                                .double(), -1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
              for m in (ours.model, ours.ref_model)]
    k = keep[:, 1:].double()
    B = k.shape[0] // 2
    r = ((lp[0] - lp[1]) * k).sum(1)
    pol = (lp[0] * k).sum(1)
    hand = {"rewards/chosen": 0.5 * r[:B].mean(), "rewards/rejected": 0.5 * r[B:].mean(),
            "rewards/margins": 0.5 * (r[:B] - r[B:]).mean(), "rewards/accuracies": (r[:B] > r[B:]).double().mean(),
            "logps/chosen": pol[:B].mean(), "logps/rejected": pol[B:].mean()}
    for key, value in hand.items():
        assert masked[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key
        assert masked[f"alphatoken/all_tokens/{key}"] == pytest.approx(plain[key], rel=1e-5, abs=1e-6), key
    assert masked["logps/chosen"] > plain["logps/chosen"]  # fewer (negative) terms in the sum
    assert masked["alphatoken/keep_ratio"] == pytest.approx(float(keep.sum() / batch["completion_mask"][:, 1:].sum()))
