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
