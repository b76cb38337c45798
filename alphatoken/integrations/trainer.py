"""transformers.Trainer / TRL SFTTrainer integration: the training loss is AlphaToken's masked loss.

    from alphatoken.integrations import AlphaTokenTrainer          # or AlphaTokenSFTTrainer, or with_alphatoken(Cls)
    trainer = AlphaTokenTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                                alphatoken=at.AlphaTokenConfig(keep_ratio=0.6), fisher=fisher)
    trainer.train()

The loss is the mean next-token NLL over the KEPT response tokens of the whole optimizer step: every micro-batch of
the gradient-accumulation window and, under DDP, every rank. Trainer counts `num_items_in_batch` before the masks
exist (over all response tokens), so the count it passes is not the one the loss needs. Two exact ways are offered:

* `alphatoken_mode="online"` (default): one forward per micro-batch, reused for the values, the mask and the loss
  (`AlphaToken.value_and_loss`). The micro-batch loss is `Σ_kept ℓ / D`, with `D` the number of response tokens of
  the window on all ranks (known before the window starts; any constant shared by the window would do). The kept
  count `K` of the window is summed as the micro-batches go; after the backward of the window's last micro-batch
  (and DDP's gradient all-reduce) the gradients are multiplied by `D / K`, before Trainer clips them and steps.
  Gradients are linear in the loss, so the result is exactly `∇ (Σ_kept ℓ / K)` over the whole window. The loss
  Trainer logs is corrected the same way. Not for DeepSpeed, which steps inside `backward`: use "ahead" there.
* `alphatoken_mode="ahead"`: when Trainer fetches the window (`get_batch_samples`), every micro-batch is valued
  first (`AlphaToken.value`, no parameter gradients, same weights as the training step), its dropped labels are
  set to -100, and Trainer's own `num_items_in_batch` is then counted over the kept tokens. The training forward is
  the trainer's unchanged loss, so it keeps TRL's chunked (fused LM head) NLL, `loss_type="dft"`, Liger, DeepSpeed.
  Costs one extra forward per micro-batch.

TRL's SFTTrainer computes its default NLL with a fused LM head that returns per-token log-probs and no logits. The
online mode does not use it: it runs the model's ordinary forward (full logits, which the head values need), so
memory is that of a plain Trainer. To keep the fused head for the training forward, set `alphatoken_mode="ahead"`.

Logged through the trainer's own `log` (every `logging_steps`), summed over all micro-batches and ranks since the
last log: `alphatoken/keep_ratio` (kept / response tokens), `alphatoken/adaptation` and `alphatoken/stability`
(means over response tokens), `alphatoken/total` (mean total value). With TRL's SFTTrainer, TRL's own `entropy`,
`mean_token_accuracy` and `num_tokens` are logged too, `entropy` and `mean_token_accuracy` over the KEPT tokens (the
tokens the loss trains on, as TRL computes them over the tokens its loss trains on; see `metrics.py`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from ..config import AlphaTokenConfig
from ..distributed import all_reduce_sum, is_distributed
from ..batch import IGNORE_INDEX, response_mask, unwrap_model

MODES = ("online", "ahead")
# batch keys that are bookkeeping, not model inputs
_NON_MODEL_KEYS = ("completion_mask", "assistant_masks", "num_items_in_batch", "seq_lengths", "alphatoken_keep",
                   "alphatoken_index")
STAT_NAMES = ("keep_ratio", "adaptation", "stability", "total")


class _Window:
    """Bookkeeping of one gradient-accumulation window (online mode)."""

    def __init__(self, n_batches: int, denominator: float):
        self.n_batches = n_batches
        self.denominator = max(float(denominator), 1.0)
        self.seen = 0
        self.kept = 0.0
        self.provisional = 0.0  # Σ of the losses training_step returned for this window


def _token_stats(tv) -> torch.Tensor:
    resp = tv.response
    return torch.stack([
        tv.mask.sum().double(), resp.sum().double(),
        (tv.adaptation * resp).sum().double(), (tv.stability * resp).sum().double(),
        (tv.total * resp).sum().double(),
    ]).detach()


def _model_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}


def build_valuer(spec, model, kwargs: dict, optimizer=None):
    """The valuer a trainer uses, built at its first training step: `spec` itself when it is a ready valuer
    (anything with value / value_and_loss / last_values), else `AlphaToken(<model unwrapped>, spec, **kwargs,
    optimizer=optimizer)`: given the trainer's optimizer, the tuned target's copy is tuned at the run's learning
    rate unless the config sets tune_lr (DESIGN §3.6)."""
    if not isinstance(spec, AlphaTokenConfig):
        return spec
    from ..engine import AlphaToken

    return AlphaToken(unwrap_model(model), spec, optimizer=optimizer, **kwargs)


def masked_loss(valuer, model, inputs: dict, num_items_in_batch=None):
    """`valuer.value_and_loss(inputs)` with its forward through `model` (the trainer's DDP/FSDP wrapper of the
    valued model), so the wrapper's gradient sync sees the training forward: passed as `forward_model=` to an
    AlphaToken; a ready valuer without that argument (a scorer) runs inside `forward_through`."""
    if hasattr(valuer, "step"):  # AlphaToken: the forward model is an argument, nothing is set on the valuer
        return valuer.value_and_loss(inputs, num_items_in_batch=num_items_in_batch, forward_model=model)
    with forward_through(valuer, model):
        return valuer.value_and_loss(inputs, num_items_in_batch=num_items_in_batch)


@contextlib.contextmanager
def forward_through(valuer, model):
    """Run `valuer`'s forwards through `model` (a DDP/FSDP wrapper of `valuer.model`) inside the block,
    so the wrapper's gradient sync sees the training forward. The engine looks through wrappers itself.
    For valuers without a `forward_model=` argument; `masked_loss` passes it to an AlphaToken instead."""
    inner = getattr(valuer, "model", None)
    if inner is None or model is inner:
        yield valuer
        return
    valuer.model = model
    try:
        yield valuer
    finally:
        valuer.model = inner


def check_dataset(dataset, name: str = "train_dataset") -> None:
    """Raise ValueError naming the first example with no response token to train on.

    Looks at what the dataset has: `labels` (every label -100, or only position 0 set), `completion` /
    `response` text (empty), `messages` (no assistant turn with content). Other datasets pass unchecked.
    """
    cols = getattr(dataset, "column_names", None)
    if cols is None:
        return
    if isinstance(cols, dict):  # DatasetDict
        for split, ds in dataset.items():
            check_dataset(ds, f"{name}[{split!r}]")
        return
    fix = "drop the example or give it a response (labels -100 only on the prompt)"
    if "labels" in cols:
        for i, labels in enumerate(dataset["labels"]):
            if not any(int(x) != IGNORE_INDEX for x in list(labels)[1:]):
                raise ValueError(f"{name}: example {i} has no response tokens (every label is -100); {fix}")
    for key in ("completion", "response"):
        if key in cols:
            for i, text in enumerate(dataset[key]):
                if text is None or (isinstance(text, str) and not text.strip()) or len(text) == 0:
                    raise ValueError(f"{name}: example {i} has an empty {key!r}; {fix}")
    if "messages" in cols and "completion" not in cols:
        for i, messages in enumerate(dataset["messages"]):
            if not any(m.get("role") == "assistant" and str(m.get("content", "")).strip() for m in messages):
                raise ValueError(f"{name}: example {i} has no assistant message to train on; {fix}")


class AlphaTokenMixin:
    """Mix into any `transformers.Trainer` subclass (before it): the training loss becomes AlphaToken's masked loss.

    Extra keyword arguments (all optional):
        alphatoken: an `AlphaTokenConfig` (default `AlphaTokenConfig()`), or a ready `AlphaToken` valuer.
        fisher, reference, validation, retention: passed to `AlphaToken(model, config, ...)` when the valuer is
            built (lazily, at the first training step, on the unwrapped model, so θ₀ is the weights training starts
            from). The trainer's optimizer goes with them: with the tuned target, the copy is tuned at the run's
            learning rate (`args.learning_rate`) unless the config sets `tune_lr`.
        alphatoken_mode: "online" (default) or "ahead"; see the module docstring for what each does to the count.
    Evaluation is untouched: `evaluate()` reports the trainer's ordinary loss over every response token (the model
    is in eval mode). `compute_loss` called on a model in train mode outside Trainer's `training_step` (a custom
    loop, a callback) returns the masked loss of that batch alone: the mean NLL over its kept tokens.
    With TRL's SFTTrainer, TRL's `entropy` and `mean_token_accuracy` are logged over the kept tokens in both modes.
    """

    def __init__(self, *args, alphatoken: Any = None, fisher=None, reference=None, validation=None,
                 retention=None, alphatoken_mode: str = "online", **kwargs):
        if alphatoken_mode not in MODES:
            raise ValueError(f"alphatoken_mode must be one of {MODES}, got {alphatoken_mode!r}")
        self._at_spec = AlphaTokenConfig() if alphatoken is None else alphatoken
        self._at_kwargs = {"fisher": fisher, "reference": reference, "validation": validation,
                           "retention": retention}
        self._at_mode = alphatoken_mode
        self._at_valuer = None
        self._at_window: Optional[_Window] = None
        self._at_in_step = False  # True inside Trainer's training_step (the window bookkeeping applies)
        self._at_stats = torch.zeros(5, dtype=torch.float64)
        check_dataset(kwargs.get("train_dataset", args[3] if len(args) > 3 else None))
        super().__init__(*args, **kwargs)
        self._at_check_setup()
        if self._at_mode == "online":
            self.loss_is_scaled_for_ga = True  # the loss is normalized over the window (then rescaled), never by GA

    # ------------------------------------------------------------------------------------------------ setup
    def _at_check_setup(self) -> None:
        args = self.args
        plugin = getattr(getattr(getattr(self, "accelerator", None), "state", None), "deepspeed_plugin", None)
        if getattr(self, "is_deepspeed_enabled", False) and getattr(plugin, "zero_stage", None) == 3:
            raise ValueError(
                "AlphaToken does not support DeepSpeed ZeRO-3 (it partitions the weights, and the drift term needs "
                "each whole weight with its θ₀; DESIGN §17): use ZeRO-1/2 with alphatoken_mode='ahead', or FSDP2")
        if self._at_mode != "online":
            return
        if getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(
                "alphatoken_mode='online' rescales the accumulated gradients before the optimizer step, but DeepSpeed "
                "steps inside backward; pass alphatoken_mode='ahead' to the trainer"
            )
        if getattr(args, "n_gpu", 1) > 1:
            raise ValueError(
                "AlphaToken does not support nn.DataParallel (several GPUs in one process); launch with "
                "`accelerate launch` or `torchrun` (DDP), or make one GPU visible with CUDA_VISIBLE_DEVICES"
            )
        loss_type = getattr(args, "loss_type", "nll")
        if isinstance(loss_type, (list, tuple)):
            loss_type = loss_type[0] if len(loss_type) == 1 else loss_type
        if loss_type not in ("nll", None) or getattr(self, "compute_loss_func", None) is not None \
                or getattr(args, "label_smoothing_factor", 0.0) > 0:
            raise ValueError(
                f"alphatoken_mode='online' trains on AlphaToken's masked NLL, which replaces loss_type={loss_type!r}, "
                "compute_loss_func and label smoothing; pass alphatoken_mode='ahead' to keep the trainer's own loss "
                "on the masked labels"
            )

    def _at_get_valuer(self, model):
        if self._at_valuer is None:
            self._at_valuer = build_valuer(self._at_spec, self.model if self.model is not None else model,
                                           self._at_kwargs, getattr(self, "optimizer", None))
        return self._at_valuer

    @property
    def alphatoken_valuer(self):
        """The AlphaToken valuer (None before the first training step when built from a config)."""
        return self._at_valuer

    # ------------------------------------------------------------------------------------------------ window
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, num_items
        for batch in batch_samples:
            if "labels" not in batch:
                raise ValueError(
                    f"AlphaToken needs `labels` in every batch (response tokens, -100 elsewhere); the batch has "
                    f"{sorted(batch)}; use a collator that builds labels (e.g. DataCollatorForLanguageModeling)"
                )
        if self._at_mode == "online":
            n_local = sum(int(response_mask(b["labels"]).sum()) for b in batch_samples)
            self._at_window = _Window(len(batch_samples), all_reduce_sum(n_local))
            return batch_samples, num_items
        # "ahead": value every micro-batch now, at the weights this step trains from, and mask its labels
        valuer = self._at_get_valuer(self.model)
        stats = torch.zeros(5, dtype=torch.float64)
        for batch in batch_samples:
            prepared = self._prepare_inputs(batch)
            tv = valuer.value(_model_inputs(prepared))
            batch["labels"] = tv.apply(batch["labels"].to(tv.mask.device)).to(batch["labels"].device)
            stats += _token_stats(tv).cpu()
        self._at_stats += all_reduce_sum(stats)
        if num_items is not None:
            num_items = self._get_num_items_in_batch(batch_samples, device)
        return batch_samples, num_items

    # ------------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if "labels" not in inputs:
            raise ValueError(f"AlphaToken needs `labels` in the batch; it has {sorted(inputs)}")
        if not self._at_in_step:  # evaluation code or a custom loop: this batch alone, mean over its kept tokens
            return self._at_standalone_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._at_mode != "online":  # "ahead": the labels were masked when the window was fetched
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        window = self._at_window
        if window is None or window.seen >= window.n_batches:  # training_step without get_batch_samples
            window = self._at_window = _Window(1, all_reduce_sum(int(response_mask(inputs["labels"]).sum())))
        valuer = self._at_get_valuer(model)
        loss = masked_loss(valuer, model, _model_inputs(inputs), window.denominator)
        tv = valuer.last_values
        stats = all_reduce_sum(_token_stats(tv).cpu())  # one small collective per micro-batch, like TRL's metrics
        self._at_stats += stats
        window.kept += float(stats[0])
        self._at_log_trl_metrics(valuer, tv, inputs)
        if is_distributed():
            import torch.distributed as dist

            loss = loss * dist.get_world_size()  # DDP averages the gradients; the loss is a global sum / D
        return (loss, None) if return_outputs else loss

    def _at_standalone_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """compute_loss outside Trainer's training step: the masked loss of this batch alone.

        The mean NLL over the batch's kept tokens (Σ_kept ℓ / num_items_in_batch when the caller passes its own
        count, which must then count kept tokens). No window, no gradient rescaling, no metrics. "ahead" values the
        batch, masks its labels and returns the trainer's own loss on them.
        """
        valuer = self._at_get_valuer(model)
        if self._at_mode == "ahead":
            tv = valuer.value(_model_inputs(inputs))
            masked = dict(inputs, labels=tv.apply(inputs["labels"].to(tv.mask.device)).to(inputs["labels"].device))
            return super().compute_loss(model, masked, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss = masked_loss(valuer, model, _model_inputs(inputs), num_items_in_batch)
        return (loss, None) if return_outputs else loss

    def _at_log_trl_metrics(self, valuer, tv, inputs) -> None:
        """TRL's SFT metrics (`entropy`, `mean_token_accuracy`, `num_tokens`) over the kept tokens, when the trainer
        keeps TRL's metric store (SFTTrainer); the online loss replaces the forward that logs them there."""
        store = getattr(self, "_metrics", None)
        logits = getattr(valuer, "last_logits", None)
        fused = getattr(valuer, "last_kept_rows", None) is not None
        if store is None or (logits is None and not fused):
            return
        from .metrics import row_sums, sft_metrics, sft_metrics_from_sums

        if logits is not None:
            metrics = sft_metrics(logits, tv.mask, inputs["labels"].to(tv.mask.device))
        else:  # the fused head kept no logits: the kept rows' logits, recomputed a chunk at a time
            metrics = sft_metrics_from_sums(row_sums(valuer.kept_logit_chunks()))
        for key, value in metrics.items():
            store["train"][key].append(value)
        if hasattr(self, "_total_train_tokens") and "attention_mask" in inputs:
            tokens = int(all_reduce_sum(float(inputs["attention_mask"].sum())))
            self._total_train_tokens += tokens // max(int(getattr(self, "_tp_size", 1) or 1), 1)
            store["train"]["num_tokens"] = [self._total_train_tokens]

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._at_in_step = True
        try:
            out = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._at_in_step = False
        window = self._at_window
        if self._at_mode != "online" or window is None:
            return out
        window.seen += 1
        window.provisional += float(out)
        if window.seen == window.n_batches:
            factor = window.denominator / window.kept if window.kept > 0 else 0.0
            if factor != 1.0:
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                if grads:  # one fused launch per device/dtype group, not one per parameter
                    with torch.no_grad():
                        torch._foreach_mul_(grads, factor)
            # the returned losses of the window now sum to the exact mean over kept tokens
            out = out + window.provisional * (factor - 1.0)
        return out

    # ------------------------------------------------------------------------------------------------ logging
    def alphatoken_metrics(self, reset: bool = True) -> dict:
        """The AlphaToken metrics since the last log (what `log` adds), summed over micro-batches and ranks."""
        kept, n, adapt, stab, total = self._at_stats.tolist()
        if reset:
            self._at_stats.zero_()
        if n == 0:
            return {}
        return {"alphatoken/keep_ratio": kept / n, "alphatoken/adaptation": adapt / n,
                "alphatoken/stability": stab / n, "alphatoken/total": total / n}

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        if "loss" in logs:  # a training log (evaluation logs carry eval_* keys)
            logs.update(self.alphatoken_metrics())
        super().log(logs, start_time)


def with_alphatoken(trainer_cls):
    """`with_alphatoken(SomeTrainer)` -> a subclass whose training loss is AlphaToken's (see AlphaTokenMixin)."""
    if issubclass(trainer_cls, AlphaTokenMixin):
        return trainer_cls
    return type(f"AlphaToken{trainer_cls.__name__}", (AlphaTokenMixin, trainer_cls),
                {"__doc__": f"{trainer_cls.__name__} with AlphaToken's masked loss.\n\n{AlphaTokenMixin.__doc__}",
                 "__module__": __name__})


def _make_trainer():
    from transformers import Trainer

    return with_alphatoken(Trainer)


AlphaTokenTrainer = _make_trainer()
