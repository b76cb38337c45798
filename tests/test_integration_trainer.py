"""transformers.Trainer / TRL SFTTrainer integration: exact kept-token normalization under gradient accumulation,
logging, a few steps lowering the masked loss, and errors that name the bad example."""
import copy

import pytest
import torch
import torch.nn.functional as F

import alphatoken as at
from alphatoken.integrations import AlphaTokenTrainer
from integration_helpers import collate, pad_batch, sft_examples, tiny_llama, tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                learning_rate=0.0, max_grad_norm=0.0, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                remove_unused_columns=False, dataloader_num_workers=0, seed=0, lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


class _Recorder:
    """Records every training micro-batch and the gradients right before the optimizer step."""

    def __init__(self):
        self.batches, self.grads = [], None

    def callback(self):
        from transformers import TrainerCallback

        rec = self

        class CB(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                if rec.grads is None:
                    rec.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

        return CB()


def _recording(cls, rec):
    class Rec(cls):
        def compute_loss(self, model, inputs, *a, **k):
            if model.training:
                rec.batches.append({k2: v.detach().clone() for k2, v in inputs.items()})
            return super().compute_loss(model, inputs, *a, **k)

    return Rec


def _hand_grads(model0, cfg, batches, **valuer_kwargs):
    """Values at θ0 per micro-batch, then ∇ (Σ_kept ℓ / K) over the whole window, computed directly."""
    model = copy.deepcopy(model0)
    with at.AlphaToken(model, cfg, **valuer_kwargs) as valuer:
        masked = [valuer.value(b).apply(b["labels"]) for b in batches]
    K = sum(int((m[:, 1:] != -100).sum()) for m in masked)
    total = 0.0
    model.zero_grad()
    for b, m in zip(batches, masked):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        s = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), m[:, 1:].reshape(-1),
                            ignore_index=-100, reduction="sum")
        (s / K).backward()
        total += float(s) / K
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, total, masked


@pytest.mark.parametrize("mode", ["online"])  # "ahead" is covered through SFTTrainer below
def test_trainer_kept_token_normalization_under_grad_accumulation(tmp_path, mode):
    from datasets import Dataset

    model = tiny_llama()
    model0 = copy.deepcopy(model)
    cfg = at.AlphaTokenConfig(keep_ratio=0.5)
    rec = _Recorder()
    trainer = _recording(AlphaTokenTrainer, rec)(
        model=model, args=_args(tmp_path), train_dataset=Dataset.from_list(sft_examples(8)), data_collator=collate,
        alphatoken=cfg, alphatoken_mode=mode, callbacks=[rec.callback()])
    trainer.train()
    assert len(rec.batches) == 2
    batches = [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "labels")} for b in rec.batches]
    if mode == "ahead":  # the recorded labels are already masked; value the original labels again
        batches = [dict(b, labels=orig) for b, orig in zip(batches, _original_labels(batches, trainer))]
    want, want_loss, masked = _hand_grads(model0, cfg, batches)
    assert set(rec.grads) == set(want)
    for name in want:
        torch.testing.assert_close(rec.grads[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    log = trainer.state.log_history[0]
    assert log["loss"] == pytest.approx(want_loss, rel=1e-4)
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    K = sum(int((m[:, 1:] != -100).sum()) for m in masked)
    assert log["alphatoken/keep_ratio"] == pytest.approx(K / n)
    assert "alphatoken/adaptation" in log and "alphatoken/stability" in log


def test_trainer_passes_validation_and_retention_to_the_valuer(tmp_path):
    from datasets import Dataset

    model = tiny_llama(seed=3)
    model0 = copy.deepcopy(model)
    cfg = at.AlphaTokenConfig(keep_ratio=0.5)
    extra = {"validation": pad_batch(sft_examples(3, seed=11)), "retention": pad_batch(sft_examples(4, seed=12))}
    rec = _Recorder()
    trainer = _recording(AlphaTokenTrainer, rec)(
        model=model, args=_args(tmp_path), train_dataset=Dataset.from_list(sft_examples(8)), data_collator=collate,
        alphatoken=cfg, callbacks=[rec.callback()], **extra)
    trainer.train()
    batches = [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "labels")} for b in rec.batches]
    want, _, masked = _hand_grads(model0, cfg, batches, **extra)
    for name in want:
        torch.testing.assert_close(rec.grads[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    _, _, without = _hand_grads(model0, cfg, batches, validation=extra["validation"])
    assert any((m != w).any() for m, w in zip(masked, without))  # the retention batch changed the kept tokens


def test_trainer_tunes_the_copy_at_its_learning_rate(tmp_path):
    """With the tuned target (validation batches, the defaults) the copy is tuned at args.learning_rate, read from
    the trainer's optimizer (accelerate's wrapper around AdamW, under a warm-up whose lr is 0 at the first step)."""
    from datasets import Dataset

    model = tiny_llama(seed=5)
    model0 = copy.deepcopy(model)
    cfg = at.AlphaTokenConfig(keep_ratio=0.5, tune_steps=4)
    validation = pad_batch(sft_examples(3, seed=13))
    rec = _Recorder()
    trainer = _recording(AlphaTokenTrainer, rec)(
        model=model, args=_args(tmp_path, learning_rate=3e-3, lr_scheduler_type="linear", warmup_steps=5),
        train_dataset=Dataset.from_list(sft_examples(8)), data_collator=collate, alphatoken=cfg,
        validation=validation, callbacks=[rec.callback()])
    trainer.train()
    valuer = trainer.alphatoken_valuer
    assert valuer.cfg.target == "tuned" and valuer.cfg.tune_lr == 3e-3
    batches = [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "labels")} for b in rec.batches]
    want, _, masked = _hand_grads(model0, cfg.replace(tune_lr=3e-3), batches, validation=validation)
    for name in want:
        torch.testing.assert_close(rec.grads[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    _, _, at_default = _hand_grads(model0, cfg.replace(tune_lr=1e-5), batches, validation=validation)
    assert any((m != d).any() for m, d in zip(masked, at_default))  # the copy's rate changed the kept tokens


def _original_labels(batches, trainer):
    ds = trainer.train_dataset
    by_ids = {tuple(e["input_ids"]): e["labels"] for e in ds}
    out = []
    for b in batches:
        labels = torch.full_like(b["labels"], -100)
        for i, row in enumerate(b["input_ids"]):
            L = int(b["attention_mask"][i].sum())
            labels[i, :L] = torch.tensor(by_ids[tuple(row[:L].tolist())])
        out.append(labels)
    return out


def test_trainer_steps_lower_masked_loss(tmp_path):
    from datasets import Dataset

    ds = Dataset.from_list(sft_examples(4))
    trainer = AlphaTokenTrainer(
        model=tiny_llama(), args=_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                                       max_steps=8, learning_rate=2e-2, max_grad_norm=1.0),
        train_dataset=ds, data_collator=collate, alphatoken=at.AlphaTokenConfig(keep_ratio=0.6, paths="direct"))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0]
    ratios = [h["alphatoken/keep_ratio"] for h in trainer.state.log_history if "loss" in h]
    assert all(0.55 <= r <= 0.75 for r in ratios)


def test_trainer_dataset_without_responses_names_the_example(tmp_path):
    from datasets import Dataset

    examples = sft_examples(4)
    examples[2]["labels"] = [-100] * len(examples[2]["labels"])
    with pytest.raises(ValueError, match="example 2 has no response tokens"):
        AlphaTokenTrainer(model=tiny_llama(), args=_args(tmp_path), train_dataset=Dataset.from_list(examples),
                          data_collator=collate)


@pytest.mark.parametrize("mode", ["online", "ahead"])
def test_sft_trainer_default_chunked_nll(tmp_path, mode):
    """TRL's SFTTrainer with its default fused-head NLL: online runs the plain forward, ahead keeps the fused loss;
    both give the exact mean over kept tokens of the window."""
    from datasets import Dataset
    from trl import SFTConfig

    from alphatoken.integrations import AlphaTokenSFTTrainer

    tok = tokenizer()
    ds = Dataset.from_list([{"prompt": p, "completion": c} for p, c in
                            [("ab", "cd e"), ("x", "yz1"), ("hello", " w"), ("12", "345 6")]])
    model = tiny_llama()
    model0 = copy.deepcopy(model)
    rec = _Recorder()
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     max_steps=1, learning_rate=0.0, max_grad_norm=0.0, logging_steps=1, report_to=[], use_cpu=True,
                     save_strategy="no", seed=0, lr_scheduler_type="constant", bf16=False)
    cfg = at.AlphaTokenConfig(keep_ratio=0.5)
    trainer = _recording(AlphaTokenSFTTrainer, rec)(model=model, args=args, train_dataset=ds, processing_class=tok,
                                                   alphatoken=cfg, alphatoken_mode=mode, callbacks=[rec.callback()])
    trainer.train()
    batches = [{k: b[k] for k in ("input_ids", "attention_mask", "labels")} for b in rec.batches]
    if mode == "ahead":
        batches = [dict(b, labels=orig) for b, orig in zip(batches, _original_labels(batches, trainer))]
    want, want_loss, _ = _hand_grads(model0, cfg, batches)
    for name in want:
        torch.testing.assert_close(rec.grads[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    log = trainer.state.log_history[0]
    assert log["loss"] == pytest.approx(want_loss, rel=1e-4)
    assert 0.4 < log["alphatoken/keep_ratio"] < 0.8


def test_sft_online_rejects_losses_it_replaces(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    from alphatoken.integrations import AlphaTokenSFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), loss_type="dft", report_to=[], use_cpu=True, max_steps=1)
    ds = Dataset.from_list([{"prompt": "ab", "completion": "cd"}])
    with pytest.raises(ValueError, match="alphatoken_mode='ahead'"):
        AlphaTokenSFTTrainer(model=tiny_llama(), args=args, train_dataset=ds, processing_class=tokenizer())


def test_sft_empty_completion_names_the_example(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig

    from alphatoken.integrations import AlphaTokenSFTTrainer

    ds = Dataset.from_list([{"prompt": "ab", "completion": "cd"}, {"prompt": "x", "completion": ""}])
    args = SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match="example 1 has an empty 'completion'"):
        AlphaTokenSFTTrainer(model=tiny_llama(), args=args, train_dataset=ds, processing_class=tokenizer())


@pytest.mark.parametrize("mode", ["online", "ahead"])
def test_compute_loss_outside_training_step_is_the_kept_token_mean(tmp_path, mode):
    """A custom loop or evaluation code calling compute_loss on a model in train mode gets the mean NLL over the
    batch's kept tokens, not the window-rescaled Σ_kept ℓ / (response tokens)."""
    from datasets import Dataset

    model = tiny_llama()
    cfg = at.AlphaTokenConfig(keep_ratio=0.5)
    trainer = AlphaTokenTrainer(model=model, args=_args(tmp_path), train_dataset=Dataset.from_list(sft_examples(8)),
                                data_collator=collate, alphatoken=cfg, alphatoken_mode=mode)
    batch = collate(sft_examples(4, seed=5))
    with at.AlphaToken(copy.deepcopy(model), cfg) as valuer:
        masked = valuer.value(batch).apply(batch["labels"])
    K = int((masked[:, 1:] != -100).sum())
    assert 0 < K < int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), masked[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum") / K
    model.train()
    for _ in range(2):  # twice: no window state carries over between calls
        got = trainer.compute_loss(model, dict(batch))
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got.backward()  # a loss to train on
    assert model.lm_head.weight.grad is not None
