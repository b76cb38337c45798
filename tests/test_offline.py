"""Offline mode: score once at θ0, save in a format `datasets` reads, train from the static masks."""
import copy

import pytest
import torch

import alphatoken as at
from alphatoken.offline import StaticMaskCollator, apply_masks, score_dataset
from alphatoken.select import select_tokens
from integration_helpers import collate, pad_batch, sft_examples, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_score_save_load_and_train_from_static_masks(tmp_path):
    import datasets
    from transformers import Trainer, TrainingArguments

    model = tiny_llama()
    ds = datasets.Dataset.from_list(sft_examples(6))
    cfg = at.AlphaTokenConfig(keep_ratio=0.5, paths="direct")
    scored = score_dataset(model, ds, cfg, batch_size=6)  # target="batch": U is the scoring batch's
    scored.save_to_disk(str(tmp_path / "scored"))
    scored = datasets.load_from_disk(str(tmp_path / "scored"))

    # dataset scope: the same as selecting on the whole dataset as one batch
    batch = pad_batch(sft_examples(6))
    with at.AlphaToken(copy.deepcopy(model), cfg) as valuer:
        tv = valuer.value(batch)
    want = select_tokens(tv.total, tv.response, cfg)
    for r, keep in enumerate(scored["alphatoken_keep"]):
        assert keep == want[r, :len(keep)].int().tolist()
        torch.testing.assert_close(torch.tensor(scored["alphatoken_total"][r]), tv.total[r, :len(keep)])

    masked = apply_masks(scored)
    for ex, keep in zip(masked, scored["alphatoken_keep"]):
        assert [y != -100 for y in ex["labels"]] == [bool(k) for k in keep]
    # the collator route gives the same labels
    coll = StaticMaskCollator(collate)
    got = coll([dict(e) for e in scored])["labels"]
    torch.testing.assert_close(got, collate([dict(e) for e in masked])["labels"])

    args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=6, max_steps=6,
                             learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=masked.select_columns(["input_ids", "labels"]),
                      data_collator=collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_dataset_without_responses_names_the_example():
    ex = sft_examples(3)
    ex[1]["labels"] = [-100] * len(ex[1]["labels"])
    with pytest.raises(ValueError, match="example 1 has no response tokens"):
        score_dataset(tiny_llama(), ex, at.AlphaTokenConfig(paths="direct"))


PAIRS = [("ab", "cd e", "zz"), ("x", "yz1", "q 2"), ("hello", " w", "x yz"), ("12", "345 6", "7"), ("q", "rs", "t u v")]


def test_offline_dpo_pairs_train_plain_trl_dpo_trainer_from_static_masks(tmp_path):
    """Score TRL-tokenized pairs once, save, reload, and train TRL's own DPOTrainer through PreferenceMaskCollator:
    its loss equals the DPO loss over the kept tokens (DESIGN §4), by hand in float64, gradients included."""
    import datasets
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from alphatoken.offline import PreferenceMaskCollator
    from integration_helpers import PAD, tokenizer

    text = datasets.Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])
    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    args = DPOConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=5, max_steps=1, report_to=[],
                     use_cpu=True, bf16=False, beta=0.5, save_strategy="no", remove_unused_columns=False)
    pairs = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args, train_dataset=text,
                       processing_class=tokenizer()).train_dataset  # TRL's tokenization: prompt_ids / chosen_ids / ...
    cfg = at.AlphaTokenConfig(keep_ratio=0.5)
    scored = score_dataset(policy, pairs, cfg, ref_model=ref, beta=0.5, batch_size=2, pad_token_id=PAD)
    scored.save_to_disk(str(tmp_path / "scored"))
    scored = datasets.load_from_disk(str(tmp_path / "scored"))
    for side in ("chosen", "rejected"):
        for ex in scored:
            keep, n_prompt = ex[f"{side}_alphatoken_keep"], len(ex["prompt_ids"])
            assert len(keep) == n_prompt + len(ex[f"{side}_ids"]) and not any(keep[:n_prompt])
    n_resp = sum(len(ex[f"{s}_ids"]) for ex in scored for s in ("chosen", "rejected"))
    n_kept = sum(sum(ex[f"{s}_alphatoken_keep"]) for ex in scored for s in ("chosen", "rejected"))
    assert n_kept == -(-n_resp // 2)  # dataset scope: the top half of every response token of the dataset

    train = apply_masks(scored)
    assert "chosen_alphatoken_total" not in train.column_names
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args, train_dataset=train,
                         processing_class=tokenizer(),
                         data_collator=PreferenceMaskCollator(DataCollatorForPreference(pad_token_id=PAD)))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()

    # by hand: which pairs are in the batch (TRL shuffles), their stored masks, plain float64 forwards
    by_prompt = {tuple(ex["prompt_ids"]): ex for ex in scored}
    B = batch["input_ids"].shape[0] // 2
    keep = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    n_completion = 0
    for r in range(2 * B):
        L = int(batch["attention_mask"][r].sum())
        ids = batch["input_ids"][r, :L].tolist()
        ex = next(e for p, e in by_prompt.items() if ids[:len(p)] == list(p))
        side = "chosen" if r < B else "rejected"
        assert ids == ex["prompt_ids"] + ex[f"{side}_ids"]
        keep[r, :L] = torch.tensor(ex[f"{side}_alphatoken_keep"], dtype=torch.bool)
        n_completion += len(ex[f"{side}_ids"])
    assert 0 < int(keep.sum()) < n_completion
    assert torch.equal(batch["completion_mask"].bool(), keep)  # the collator left exactly the kept tokens
    model = copy.deepcopy(policy).double()
    lp = []
    for m in (model, copy.deepcopy(ref).double()):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        lp.append(torch.log_softmax(logits, -1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2))
    r = ((lp[0] - lp[1].detach()) * keep[:, 1:]).sum(1)
    hand = -torch.nn.functional.logsigmoid(0.5 * (r[:B] - r[B:])).mean()
    hand.backward()
    torch.testing.assert_close(loss.double(), hand.detach(), rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(trainer.model.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_pair_scores_are_the_dpo_credit_values():
    """scope="batch" with one batch: the stored values are the engine's values under the DPO loss's per-pair credits;
    the dataset scope selects over chosen and rejected rows together."""
    from alphatoken.dpo import dpo_token_weights
    from alphatoken.losses import response_mask, token_logprobs

    examples = sft_examples(6, seed=2)
    pairs = [{"chosen_input_ids": a["input_ids"], "chosen_labels": a["labels"], "rejected_input_ids": b["input_ids"],
              "rejected_labels": b["labels"]} for a, b in zip(examples[:3], examples[3:])]
    policy, ref = tiny_llama(seed=0), tiny_llama(seed=1)
    cfg = at.AlphaTokenConfig(keep_ratio=0.5)
    scored = score_dataset(policy, pairs, cfg, ref_model=ref, beta=0.3, batch_size=3, scope="batch")
    batch = pad_batch(examples)
    with torch.no_grad():
        ref_lp = token_logprobs(ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                batch["labels"])
    weights = dpo_token_weights(ref_lp, 0.3, response_mask(batch["labels"]))
    with at.AlphaToken(copy.deepcopy(policy), cfg) as valuer:
        tv = valuer.value(batch, token_weights=lambda lp: weights(lp) * 3)
    for i, ex in enumerate(scored):
        for j, side in enumerate(("chosen", "rejected")):
            row, L = 3 * j + i, len(ex[f"{side}_input_ids"])
            torch.testing.assert_close(torch.tensor(ex[f"{side}_alphatoken_total"]), tv.total[row, :L])
            assert ex[f"{side}_alphatoken_keep"] == tv.mask[row, :L].int().tolist()
    masked = apply_masks(scored)  # alphatoken score's layout: the labels themselves are masked
    for ex in masked:
        for side in ("chosen", "rejected"):
            assert [y != -100 for y in ex[f"{side}_labels"]] == [bool(k) for k in ex[f"{side}_alphatoken_keep"]]
    whole = score_dataset(policy, pairs, cfg, ref_model=ref, beta=0.3, batch_size=3)
    want = select_tokens(tv.total, tv.response, cfg)
    for i, ex in enumerate(whole):
        for j, side in enumerate(("chosen", "rejected")):
            assert ex[f"{side}_alphatoken_keep"] == want[3 * j + i, :len(ex[f"{side}_input_ids"])].int().tolist()


def test_apply_masks_names_both_ways_to_score():
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(ValueError, match="prompt_ids/chosen_ids/rejected_ids"):
        apply_masks(ds)
    with pytest.raises(ValueError, match="tokenize them first"):
        score_dataset(tiny_llama(), ds, at.AlphaTokenConfig(paths="direct"))
