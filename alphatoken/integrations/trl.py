"""TRL integrations: AlphaTokenSFTTrainer and AlphaTokenDPOTrainer (extra: `pip install -e ".[trl]"` in the checkout).

    from alphatoken.integrations import AlphaTokenSFTTrainer, AlphaTokenDPOTrainer
    AlphaTokenSFTTrainer(model=model, args=SFTConfig(...), train_dataset=ds, alphatoken=cfg, fisher=fisher).train()
    AlphaTokenDPOTrainer(model=model, ref_model=ref, args=DPOConfig(...), train_dataset=pairs, alphatoken=cfg).train()

SFT: see `alphatoken.integrations.trainer` (online mode runs the ordinary forward instead of TRL's fused LM head;
`alphatoken_mode="ahead"` keeps TRL's chunked NLL for the training forward).

DPO (DESIGN §4): per-token log-ratios `r_t = log π(y_t) − log π_ref(y_t)` are summed over KEPT tokens only, in the
chosen and rejected responses alike, before `−log σ(β(Σ_c − Σ_r))`; the values are those of the DPO loss's own
credits (`alphatoken.dpo.dpo_token_weights`). One forward of the policy serves the values, the mask and the loss;
the reference runs TRL's fused per-token log-prob forward (no logits). Supported: `loss_type="sigmoid"` (standard
DPO), `f_divergence_type="reverse_kl"`, no `ld_alpha`, no `precompute_ref_log_probs` (it stores only per-sequence
sums, and the masked sums need per-token reference log-probs). Evaluation reports TRL's unmasked DPO loss.
Logged: TRL's own DPO metrics under TRL's names, each over the KEPT tokens, i.e. the sums the masked loss is made
of (with keep_ratio=1.0 they equal TRL's): `rewards/chosen`, `rewards/rejected` (β · kept log-ratio sums),
`rewards/margins`, `rewards/accuracies`, `logps/chosen`, `logps/rejected` (kept log-prob sums), `logits/chosen`,
`logits/rejected`, `entropy`, `mean_token_accuracy`, `num_tokens`; the same rewards and log-probs over EVERY
response token (what a plain DPO run would log) as `alphatoken/all_tokens/rewards/*` and
`alphatoken/all_tokens/logps/*`; and `alphatoken/keep_ratio`, `alphatoken/adaptation`, `alphatoken/stability`,
`alphatoken/total`. `DPOConfig.beta` must be a finite number > 0.
"""
from __future__ import annotations

import torch

from ..config import AlphaTokenConfig
from ..distributed import all_reduce_sum
from ..batch import response_mask
from ..dpo import check_beta, check_pairs, completion_labels, dpo_step
from ..tokens import token_logprobs
from .trainer import _token_stats, build_valuer, with_alphatoken

try:
    import trl  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError('the TRL integrations need TRL: pip install -e ".[trl]" in the AlphaToken checkout') from err

from trl import DPOTrainer, SFTTrainer

AlphaTokenSFTTrainer = with_alphatoken(SFTTrainer)
AlphaTokenSFTTrainer.__module__ = __name__


def check_preference_dataset(dataset, name: str = "train_dataset") -> None:
    """Raise ValueError naming the first example whose chosen or rejected side is empty."""
    if dataset is None or not hasattr(dataset, "column_names"):
        return
    cols = dataset.column_names
    if isinstance(cols, dict):  # DatasetDict
        for split, ds in dataset.items():
            check_preference_dataset(ds, f"{name}[{split!r}]")
        return
    for side in ("chosen", "rejected"):
        for key in (side, f"{side}_ids", f"{side}_input_ids"):
            if key not in cols:
                continue
            for i, value in enumerate(dataset[key]):
                empty = value is None or len(value) == 0 or (isinstance(value, str) and not value.strip())
                if not empty and isinstance(value, list) and value and isinstance(value[0], dict):
                    empty = all(not str(m.get("content", "")).strip() for m in value)
                if empty:
                    raise ValueError(
                        f"{name}: example {i}: the {side} response is empty; every preference pair needs a non-empty "
                        "chosen and rejected response (drop or fix the example)"
                    )
    if "chosen" not in cols and "chosen_ids" not in cols:
        raise ValueError(f"{name} has no 'chosen'/'rejected' columns (it has {cols}); DPO needs preference pairs")


class AlphaTokenDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with AlphaToken's masked DPO loss (see the module docstring).

    Extra keyword arguments: `alphatoken` (an AlphaTokenConfig, default AlphaTokenConfig(), or a ready valuer),
    `fisher`, `reference`, `validation`, `retention` (passed to AlphaToken when it is built on the policy, at the
    first step, with the trainer's optimizer: the tuned target's copy is tuned at the run's learning rate).
    """

    def __init__(self, *args, alphatoken=None, fisher=None, reference=None, validation=None, retention=None,
                 **kwargs):
        self._at_spec = AlphaTokenConfig() if alphatoken is None else alphatoken
        self._at_kwargs = {"fisher": fisher, "reference": reference, "validation": validation,
                           "retention": retention}
        self._at_valuer = None
        check_preference_dataset(kwargs.get("train_dataset", args[4] if len(args) > 4 else None))
        args_ = kwargs.get("args", args[2] if len(args) > 2 else None)
        if args_ is not None and hasattr(args_, "beta"):
            check_beta(args_.beta, "DPOConfig.beta")
        super().__init__(*args, **kwargs)
        self.beta = check_beta(self.beta, "DPOConfig.beta")
        if self.loss_types != ["sigmoid"] or self.f_divergence_type != "reverse_kl" or self.ld_alpha is not None:
            raise ValueError(
                "AlphaTokenDPOTrainer supports the standard DPO loss only: loss_type='sigmoid', "
                f"f_divergence_type='reverse_kl', ld_alpha=None (got loss_type={self.loss_types}, "
                f"f_divergence_type={self.f_divergence_type!r}, ld_alpha={self.ld_alpha})"
            )
        if self.precompute_ref_logps:
            raise ValueError(
                "precompute_ref_log_probs=True stores per-sequence reference sums, but the masked DPO loss sums the "
                "reference log-probs over kept tokens only; set precompute_ref_log_probs=False"
            )
        if self.use_weighting:
            raise ValueError("use_weighting=True (WPO) is not supported by AlphaTokenDPOTrainer; set it to False")

    @property
    def alphatoken_valuer(self):
        return self._at_valuer

    def _at_get_valuer(self, model):
        if self._at_valuer is None:
            self._at_valuer = build_valuer(self._at_spec, self.model, self._at_kwargs, getattr(self, "optimizer", None))
        return self._at_valuer

    def reference_token_logps(self, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """(2B, T) reference log-probs aligned with labels (0 outside the response), by TRL's own reference path."""
        from accelerate.utils import is_peft_model
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        kwargs = {k: v for k, v in inputs.items()
                  if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps", "output_router_logits")}
        kwargs["use_cache"] = False
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if is_peft_model(self.model) and self.ref_model is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    out = self.model(**kwargs, labels=labels, fused_lm_head=True)
            else:
                out = self.ref_model(**kwargs, labels=labels, fused_lm_head=True)
        T = labels.shape[1]
        ref = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        ref[:, 1:] = out.log_probs[:, -(T - 1):].float()
        return ref * response_mask(labels)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train"
        labels = completion_labels(inputs["input_ids"], inputs["completion_mask"])
        check_pairs(labels)
        ref = self.reference_token_logps(inputs, labels)
        batch = {k: v for k, v in inputs.items()
                 if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        batch["labels"] = labels
        valuer = self._at_get_valuer(model)
        result = dpo_step(valuer, batch, ref, self.beta, forward_model=model)
        loss, tv, out = result.loss, result.values, result.output
        kept, n, adapt, stab, total = all_reduce_sum(_token_stats(tv).cpu()).tolist()
        if n:
            for key, value in (("keep_ratio", kept / n), ("adaptation", adapt / n), ("stability", stab / n),
                               ("total", total / n)):
                self._metrics[mode][f"alphatoken/{key}"].append(value)
        self._at_log_trl_metrics(mode, result.logits, tv, labels, ref, out, inputs)
        return (loss, None) if return_outputs else loss

    def _at_log_trl_metrics(self, mode, logits, tv, labels, ref, out, inputs) -> None:
        """TRL's DPO metrics over the kept tokens (alphatoken.integrations.metrics), plus the all-token rewards."""
        from ..dpo import masked_dpo_loss
        from .metrics import dpo_metrics

        with torch.no_grad():
            policy = token_logprobs(logits, labels.to(logits.device)) if logits is not None else None
            everything = (masked_dpo_loss(policy, ref.to(policy.device), response_mask(labels).to(policy.device),
                                          self.beta) if policy is not None else None)
        if logits is not None:
            metrics = dpo_metrics(logits, tv.mask, labels.to(logits.device), out, self.beta, all_tokens=everything)
        else:  # a valuer that keeps no logits: the reward figures only
            from .metrics import reward_metrics

            metrics = reward_metrics(out, self.beta, "")
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        if mode == "train" and "attention_mask" in inputs:
            tokens = int(all_reduce_sum(float(inputs["attention_mask"].sum())))
            self._total_train_tokens += tokens // max(int(getattr(self, "_tp_size", 1) or 1), 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
