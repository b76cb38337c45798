"""AlphaToken: value every response token on adaptation and stability, on the direct and causal paths.

One call of `value(batch)`:
  1. forward with capture hooks on the tracked layers (body outputs probed when paths="full");
  2. head (direct path): g_t = w_t (softmax(logits_{t-1}) − onehot(y_t)) at the rows that predict response
     tokens — no backward; values from the head credits g_t a_tᵀ. The head is fused and chunked (alphatoken.head):
     the model's head runs on one row only, and NLL, g, values and the seed g W come chunk by chunk from the
     captured head input, with no (tokens × vocab) tensor. Heads it cannot fuse (a post-head map other than
     logit scaling or soft-capping, a custom loss_fn) run on the response rows only and are valued the same way;
  3. body (causal path): one valuation backward of L = Σ_t w_t ℓ_t towards the probes (input-gradients only);
     each layer's values are computed as its g arrives, at the response rows t;
  4. combine (DESIGN §3) and select (DESIGN §4).
`value_and_loss(batch)` keeps the forward graph for the training backward of the masked loss, which goes through
the same chunked head (`head_loss.chunked_head_loss`, an autograd Function recomputing chunks in its backward).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn

from .anchor import Anchor
from .batch import (BATCH_KEYS, model_inputs, response_mask, response_rows,  # noqa: F401
                    unwrap_model, validate_batch)  # BATCH_KEYS: re-exported
from .config import AlphaTokenConfig
from .combine import PathValues, combine_paths, credit_square_norm, percentile_rank
from .credits import Direction, embedding_values, linear_values
from .distributed import all_reduce_sum, gather_values, is_distributed
from .fisher import Fisher
from .head import CHECK_ROWS, candidate_transform, fused_chunks, head_values, matches, materialized_chunks
from .head_loss import chunked_head_loss
from .hooks import Capture, CaptureSession, LayerRows
from .layers import TrackedLayer, discover_layers, unvalued_weights
from .losses import kept_mean_nll, masked_causal_lm_loss
from .gap import check_loss_gap, tuned_nll, uses_loss_gap
from .own import check_own_path, own_adaptation
from .select import protected_tokens, select_tokens
from .sharding import check_head_for_training, check_sharding, full, hold_unsharded, is_sharded, store_like
from .targets import (batch_direction, pad_zeroed, resolve_auto, retention_cycle, retention_scale, tuned_target,
                      validation_cycle, validation_directions, with_retention)
from .tokens import accumulation_dtype, nll_with_graph
from .tuned import copy_learning_rate
from .values import StepResult, TokenValues
from alphatoken import kernels as K

TokenWeights = Union[None, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


@dataclass
class _Step:
    """What one step hands to `value_and_loss`: the values, the model's logits, and the head's loss inputs
    (fused: the flattened head input in the graph, the response rows, targets and NLL; unfused: the NLL rows
    in the graph)."""

    values: Optional[TokenValues]
    logits: torch.Tensor
    head_rows: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None
    nll: Optional[torch.Tensor] = None
    head_input: Optional[torch.Tensor] = None
    grad_rows: Optional[torch.Tensor] = None
    nll_graph: Optional[torch.Tensor] = None


class NonFiniteError(FloatingPointError):
    """NaN or Inf in the loss, a captured gradient or a value; the message names where."""


class AlphaToken:
    """Path-aware token valuation for a causal LM. See DESIGN.md §3–§5 and `AlphaTokenConfig`.

    model: any transformers causal LM (nn.Linear / Conv1D layers, a linear head from get_output_embeddings()).
    fisher: an `alphatoken.Fisher` over the tracked layers, or None (stability is 0, with a warning).
    reference: θ₀ for the drift term: None (snapshot now), a state dict, or a module.
    validation: a batch, or an iterable of batches cycled every `cfg.refresh` steps (target="validation"), or
        the batches a copy of the model is tuned on (target="tuned").
    retention: with the validation target, a batch (or an iterable of batches, cycled with the validation ones)
        of what the model must keep saying, e.g. `alphatoken.retention.own_answers(model, tokenizer)`: U becomes
        ∇L_val + μ·∇L_ret (μ = cfg.retention_weight; DESIGN §3.8).
    tuned: with target="tuned", the model (or its state dict) already tuned on the validation batches; without
        it the valuer tunes a copy itself (`cfg.tune_steps` AdamW steps at `cfg.tune_lr`).
    optimizer: the run's optimizer; with target="tuned", cfg.tune_lr=None and no `tuned`, the copy is tuned at its
        learning rate (Adam-like optimizers; DESIGN §3.6). Only read here; the valuer never steps it.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: Optional[AlphaTokenConfig] = None,
        fisher: Optional[Fisher] = None,
        reference=None,
        validation=None,
        tuned=None,
        retention=None,
        optimizer=None,
    ):
        self.model = model  # what runs forward (possibly a DDP / accelerate wrapper)
        self.cfg = cfg = cfg or AlphaTokenConfig()
        if not isinstance(cfg, AlphaTokenConfig):
            raise TypeError(f"cfg must be an AlphaTokenConfig, got {type(cfg).__name__}")
        self.layers: list[TrackedLayer] = discover_layers(unwrap_model(model), cfg.tracked_layers, cfg.track_embeddings)
        check_sharding(self.layers, cfg.target)
        self.device = self.layers[0].weight.device
        unvalued = unvalued_weights(unwrap_model(model))
        if unvalued:
            warnings.warn(
                f"AlphaToken: {len(unvalued)} trainable weights are in modules that are not nn.Linear, Conv1D or "
                f"nn.Embedding (e.g. {unvalued[0]!r}), so the values do not cover them; "
                "valuer.tracked_parameters() lists the weights they are defined over", stacklevel=2)
        self.fisher_entries: dict[str, tuple] = {}
        if fisher is None:
            warnings.warn("AlphaToken: fisher=None, so stability is 0 (pass at.estimate_fisher(...) to value it)",
                          stacklevel=2)
            self.anchor = None
        else:
            if not isinstance(fisher, Fisher):
                raise TypeError(f"fisher must be an alphatoken.Fisher or None, got {type(fisher).__name__}")
            fisher.check_layers(self.layers)
            for layer in self.layers:
                self.fisher_entries[layer.name] = self._store_fisher(fisher, layer)
            self.anchor = Anchor(self.layers, reference, cfg.reference_device, cfg.reference_dtype)
        self.preconditioners: dict[str, tuple] = {}
        if cfg.precondition:
            if fisher is None or fisher.kind != "kfac":
                raise ValueError("precondition=True measures adaptation in the kfac Fisher's metric: pass "
                                 "fisher=at.estimate_fisher(model, batches, kind='kfac')")
            if cfg.track_embeddings:
                raise ValueError("precondition=True is not available with track_embeddings=True")
            for name, (_, f_out, f_in) in self.fisher_entries.items():
                self.preconditioners[name] = tuple(
                    (f + cfg.precondition_damping * f.mean().clamp(min=torch.finfo(f.dtype).tiny)).rsqrt()
                    for f in (f_out, f_in))
        self.cfg = cfg = resolve_auto(cfg, validation, fisher, retention,
                                      any(is_sharded(layer.weight) for layer in self.layers))
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise TypeError(f"optimizer must be the run's torch optimizer, got {type(optimizer).__name__}")
        if cfg.target == "tuned" and tuned is None:
            self.cfg = cfg = cfg.replace(tune_lr=copy_learning_rate(cfg.tune_lr, optimizer, stacklevel=3))
        check_own_path(cfg, self.layers)
        check_loss_gap(cfg)
        self.validation_batches = None
        self.directions: dict[int, Direction] = {}
        self.tuned_weights: Optional[Anchor] = None
        if cfg.target == "tuned":
            self.tuned_weights, self.directions = tuned_target(self.layers, model, tuned, validation, cfg)
        elif tuned is not None:
            raise ValueError(f'tuned= is the reference of target="tuned"; this config has target={cfg.target!r}')
        if cfg.target == "validation":
            self.validation_batches = validation_cycle(validation)
        self.retention_batches = retention_cycle(retention, cfg)
        self.retention_factor: Optional[float] = None  # the factor on ∇L_ret at the last refresh (DESIGN §3.8)
        self.capture = Capture(self.layers)
        self.steps = 0
        self._last_values: Optional[TokenValues] = None
        self._last_result: Optional[StepResult] = None  # the last `step`'s result (read by the properties below)
        self.head_transform = candidate_transform(unwrap_model(model))
        self.head_fusable: Optional[bool] = None  # decided at the first step, from the model's own logits
        self.chunk_rows: Optional[int] = None  # rows per head chunk (None: kernels.chunk_rows_for)
        self._flags: Optional[list] = None
        self.closed = False

    # ---------------------------------------------------------------- public surface
    @property
    def last_values(self) -> Optional[TokenValues]:
        """The TokenValues of the last `value` / `value_and_loss` / `step` (read-only; `step` returns them)."""
        return self._last_values

    @property
    def last_logits(self) -> Optional[torch.Tensor]:
        """The model's full logits of the last step with a custom loss_fn (`StepResult.logits`), else None."""
        return None if self._last_result is None else self._last_result.logits

    @property
    def last_kept_rows(self) -> Optional[tuple]:
        """(head-input rows, targets) of the kept tokens of the last fused step (`StepResult.kept_rows`)."""
        return None if self._last_result is None else self._last_result.kept_rows

    def tracked_parameters(self) -> list[nn.Parameter]:
        """The parameters the values are defined over (tied weights once)."""
        seen, params = set(), []
        for layer in self.layers:
            if id(layer.weight) not in seen:
                seen.add(id(layer.weight))
                params.append(layer.weight)
        return params

    def tracked_layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def value(self, batch, token_weights: TokenWeights = None, forward_model: Optional[nn.Module] = None) -> TokenValues:
        """TokenValues of one batch. Never changes any parameter's `.grad`.

        token_weights: per-token loss weights w (B, T), or a callable of the detached per-token log-probs
            (B, T) returning them; the valued loss is then Σ_t w_t ℓ_t (DPO uses its own credits this way).
        forward_model: run the forward through this module instead (e.g. the DDP wrapper of the model).
        """
        values = self._run(batch, token_weights, keep_graph=False, forward_model=forward_model).values
        self._last_values = values
        return values

    def value_and_loss(
        self,
        batch,
        loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        num_items_in_batch=None,
        token_weights: TokenWeights = None,
        forward_model: Optional[nn.Module] = None,
    ) -> torch.Tensor:
        """Value the batch and return the masked loss from the same forward (call `.backward()` on it).

        Default loss: mean next-token NLL over the kept tokens (sum / num_items_in_batch when given), through
        the chunked head (no (tokens × vocab) logits). `loss_fn(logits, masked_labels)` replaces it; the model
        then computes its full logits. The TokenValues of the batch are also in `self.last_values` for logging;
        `step` returns everything the step computed.
        """
        return self.step(batch, loss_fn, num_items_in_batch, token_weights, forward_model).loss

    def step(
        self,
        batch,
        loss_fn: Optional[Callable] = None,
        num_items_in_batch=None,
        token_weights: TokenWeights = None,
        forward_model: Optional[nn.Module] = None,
    ) -> StepResult:
        """`value_and_loss`, returning a `StepResult`: the loss, the values, and what logging or DPO needs.

        loss_fn may return the loss tensor, or an object with a `.loss` (e.g. `dpo.DPOOutput`), which is then
        the result's `output`.
        """
        _check_num_items(num_items_in_batch)
        if loss_fn is None:
            check_head_for_training(unwrap_model(self.model), self.layers[0].module)
        step = self._run(batch, token_weights, keep_graph=True, forward_model=forward_model,
                         full_logits=loss_fn is not None)
        values = step.values
        labels = values.apply(batch["labels"].to(values.mask.device))
        if loss_fn is not None:  # a custom loss (DPO) needs the model's full logits anyway: kept for its metrics
            out = loss_fn(step.logits, labels)
            loss, output = (out, None) if isinstance(out, torch.Tensor) else (out.loss, out)
            result = StepResult(loss, values, logits=step.logits, output=output)
        elif step.head_rows is None:  # no response token: a zero loss that still backpropagates
            result = StepResult(masked_causal_lm_loss(step.logits, labels, num_items_in_batch), values)
        elif step.head_input is None:  # the unfused head: the valuation's own per-token NLL (graph kept)
            kept = values.mask[values.response]
            result = StepResult(kept_mean_nll(step.nll_graph, kept, num_items_in_batch, step.logits), values)
        else:
            result = self._fused_loss(step, num_items_in_batch)
        self._last_values, self._last_result = values, result
        return result

    def _fused_loss(self, step: "_Step", num_items_in_batch) -> StepResult:
        """The masked mean NLL of the kept tokens through the chunked head (`head_loss.chunked_head_loss`)."""
        values = step.values
        kept = values.mask[values.response]
        rows = kept.nonzero().squeeze(1)  # the kept rows (selection's own read of the device)
        denom = num_items_in_batch if num_items_in_batch is not None else kept.sum().clamp(min=1)
        head = self.layers[0]
        a = step.head_input.index_select(0, step.head_rows.index_select(0, rows))
        targets = step.targets.index_select(0, rows)
        # FSDP2 may have resharded the head after the valuation backward: its unit is unsharded again for the
        # training backward, whose post-backward reduces the head's gradient and reshards it (DESIGN §16)
        with hold_unsharded(unwrap_model(self.model), head.module, reshard=False):
            weight = head.weight_matrix()
        loss = chunked_head_loss(a, weight, getattr(head.module, "bias", None), targets,
                                 torch.as_tensor(denom, device=a.device), self.head_transform,
                                 nll=step.nll.index_select(0, rows), chunk_rows=self.chunk_rows,
                                 grad_rows=None if step.grad_rows is None else step.grad_rows.index_select(0, rows))
        return StepResult(loss, values, kept_rows=(a.detach(), targets))

    @torch.no_grad()
    def kept_logit_chunks(self, chunk_rows: int = 1024):
        """(logits (rows, V) float32, targets (rows,)) of the last `value_and_loss`'s kept tokens, a chunk at a
        time (the fused head keeps no logits; logging recomputes them from the captured head input)."""
        if self.last_kept_rows is None:
            return
        a, targets = self.last_kept_rows
        head = self.layers[0]
        with hold_unsharded(unwrap_model(self.model), head.module):  # FSDP2 has resharded it after the backward
            weight, bias = head.weight_matrix().detach(), getattr(head.module, "bias", None)
            for s in range(0, a.shape[0], chunk_rows):
                z = nn.functional.linear(a[s:s + chunk_rows].to(weight.dtype), weight,
                                         None if bias is None else bias.detach())
                yield self.head_transform(z).float(), targets[s:s + chunk_rows]

    def close(self) -> None:
        """Remove every hook and drop captured state (idempotent)."""
        self.capture.remove()
        self.closed = True

    def __enter__(self) -> "AlphaToken":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- one step
    def _run(self, batch, token_weights: TokenWeights, keep_graph: bool, forward_model=None,
             full_logits: bool = False) -> "_Step":
        if self.closed:
            raise RuntimeError("this AlphaToken was closed; create a new one")
        cfg = self.cfg
        batch = validate_batch(batch, self.device)
        labels = batch["labels"]
        response = response_mask(labels)
        B, T = labels.shape
        if self.validation_batches is not None and self.steps % cfg.refresh == 0:
            self._refresh_validation(forward_model)
        self.steps += 1

        body = cfg.paths == "full" and len(self.layers) > 1
        rows = response_rows(response)  # one read of the device, selection's own
        b, t = rows.b, rows.t
        n = rows.n
        if self._is_global():  # every rank takes the same branches and joins every collective, in order
            n = int(all_reduce_sum(n))
        head_rows, body_rows = rows.head, rows.tokens
        fuse = n > 0 and not full_logits and self.head_fusable is not False
        feed = None  # the rows the model's own head runs on: one row once the fused head is trusted
        if n > 0 and not full_logits:
            feed = head_rows[:1] if fuse and self.head_fusable else head_rows
        model = forward_model if forward_model is not None else self.model
        session = self.capture.session(set(range(1, len(self.layers))) if body and n > 0 else set(), B * T,
                                       head_rows=feed)
        # the graph is kept for the body backward, the masked loss, or a logit transform
        logits = session.forward(model, model_inputs(model, batch))
        held = contextlib.ExitStack()  # the head's weight unsharded while the valuation (and the loss) needs it
        try:
            if n == 0:
                return _Step(self._empty(response), logits)
            held.enter_context(hold_unsharded(unwrap_model(self.model), self.layers[0].module, reshard=not keep_graph))
            fed = self.capture.head_fed
            x = self.capture.inputs[0]
            head_input = x.reshape(-1, x.shape[-1])
            a_rows = head_input.index_select(0, head_rows).detach()
            targets = labels[b, t]
            head = self.layers[0]
            weight = head.weight_matrix().detach()
            bias = getattr(head.module, "bias", None)
            bias = None if bias is None else bias.detach()
            if fuse and not self.head_fusable:
                with torch.no_grad():
                    linear = nn.functional.linear(a_rows[:min(CHECK_ROWS, feed.numel())], weight, bias) if fed else None
                fuse = self._trust_fused_head(fed, logits, head_rows.numel(), linear)
            step = _Step(None, logits, head_rows=head_rows, targets=targets)
            self._flags = []  # finiteness checks, kept on the device and read once after the backward
            if fuse:
                nll = None
                if callable(token_weights):  # the weights read every token's NLL first: one pass for it
                    nll = K.head_nll(a_rows, weight, bias, targets, self.head_transform.scale,
                                     self.head_transform.softcap, self.chunk_rows)
                like = nll if nll is not None else a_rows.new_zeros(a_rows.shape[0], dtype=accumulation_dtype(a_rows))
                weights = None if token_weights is None else self._weights(token_weights, like, b, t, (B, T))
                chunks = fused_chunks(a_rows, weight, bias, targets, weights, self.head_transform, self.chunk_rows)
                reuse = keep_graph and token_weights is None  # the seed rows are then the loss's own ∂ℓ/∂a
                hv = self._direct(a_rows, weight, chunks, n, body or reuse)
                nll = hv.nll if nll is None else nll
                step.grad_rows = hv.seed if reuse else None
                self._check_finite(nll, "the loss (per-token NLL of the response tokens)", defer=True)
                step.nll, step.head_input = nll, (head_input if keep_graph else None)
            else:
                rows = logits.reshape(-1, logits.shape[-1]) if fed else logits[b, t - 1]
                logp_graph, nll_graph = nll_with_graph(rows, targets)
                logp, nll = logp_graph.detach(), nll_graph.detach()
                self._check_finite(nll, "the loss (per-token NLL of the response tokens)")
                weights = self._weights(token_weights, nll, b, t, (B, T))
                with torch.enable_grad():
                    loss = (weights * nll_graph).sum()
                g = self._head_gradient(logits, logp, targets, weights, None if fed else head_rows, loss)
                hv = self._direct(a_rows, weight, materialized_chunks(g, self.chunk_rows), n, body)
                del g
                step.nll_graph = nll_graph
            adaptation = hv.adaptation
            if cfg.direct_layers == "all":  # the token's own value over every tracked layer (DESIGN §3.9)
                adaptation = own_adaptation(unwrap_model(self.model), self.layers, self.directions.get, batch,
                                            head_rows, targets, cfg.lr,
                                            "once" if cfg.target == "tuned" else "sum",
                                            self.head_transform if fuse else None,
                                            self.chunk_rows).to(hv.adaptation.dtype)
                if token_weights is not None:
                    adaptation = adaptation * weights.to(adaptation.dtype)
            gap = copy_loss = None
            if uses_loss_gap(cfg):
                gap, copy_loss = self._tuned_copy_losses(batch, head_rows, targets, nll.to(hv.adaptation.dtype),
                                                         fuse, None if token_weights is None else weights)
            direct = PathValues(adaptation, hv.stability, hv.square_norm)
            causal = PathValues.zeros_like(direct)
            if body:
                causal = self._causal(session, hv.seed, head_rows, batch, body_rows, n, keep_graph)
            self._raise_if_nonfinite()
            step.values = self._combine(direct, causal, n, b, t, response, labels, gap, copy_loss)
            return step
        finally:
            self._flags = None
            self.capture.release()
            held.close()

    def _tuned_copy_losses(self, batch, head_rows, targets, nll, fuse: bool,
                           weights) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,) each: the tuned copy's exact loss gap ℓ_t(θ) − ℓ_t(θ_val) (DESIGN §3.10) and its own loss
        ℓ_t(θ_val) (§3.11), both times the token weights."""
        copy_loss = tuned_nll(unwrap_model(self.model), self.layers, self.tuned_weights.reference, batch, head_rows,
                              targets, self.head_transform if fuse else None, self.chunk_rows).to(nll.dtype)
        gap = nll - copy_loss
        if weights is not None:
            gap, copy_loss = gap * weights.to(gap.dtype), copy_loss * weights.to(gap.dtype)
        self._check_finite(gap, "the loss gap to the tuned copy", defer=True)
        return gap, copy_loss

    def _trust_fused_head(self, fed: bool, logits: torch.Tensor, rows: int, linear) -> bool:
        """Whether the chunked head may stand in for the model's: its logits are the head output under the
        post-head map read from the config (`head.HeadTransform`), checked on the rows the head ran on. Decided
        at the first step that has rows (then the head ran on all of them); later steps read nothing back."""
        if self.head_fusable:  # decided: the model's head ran on one row only (nothing to read back)
            return True
        ok = fed and matches(self.head_transform, self.capture.head_output, logits, linear)
        if self.head_fusable is None:
            if fed and rows == 0:
                return False  # nothing to check on this rank yet; the unfused path costs nothing here
            self.head_fusable = ok
            if not ok:
                warnings.warn(
                    f"AlphaToken: {type(unwrap_model(self.model)).__name__}'s logits are not its head's output "
                    f"under {self.head_transform} (an unknown post-head map or a lower-precision cast), so the head "
                    "runs unfused, on the response rows only: it holds (response tokens × vocab) values",
                    stacklevel=4)
        return ok

    def _empty(self, response: torch.Tensor) -> TokenValues:
        zero = torch.zeros(response.shape, dtype=torch.float32, device=response.device)
        return TokenValues(zero, zero.clone(), zero.clone(), zero.clone(), zero.clone(),
                           torch.zeros_like(response), response)

    def _weights(self, token_weights: TokenWeights, nll, b, t, shape) -> torch.Tensor:
        if token_weights is None:
            return torch.ones_like(nll)
        if callable(token_weights):
            logprobs = torch.zeros(shape, dtype=torch.float32, device=nll.device)
            logprobs[b, t] = -nll
            token_weights = token_weights(logprobs)
        if not isinstance(token_weights, torch.Tensor) or tuple(token_weights.shape) != tuple(shape):
            raise ValueError(f"token_weights must be a {tuple(shape)} tensor (or a callable returning one)")
        w = token_weights.to(nll.device, nll.dtype).detach()[b, t]
        self._check_finite(w, "token_weights")
        return w

    # ---------------------------------------------------------------- the two paths
    def _store_fisher(self, fisher: Fisher, layer: TrackedLayer) -> tuple:
        """The layer's Fisher entry in the accumulation dtype: ("kfac", f_out, f_in) on the device, or ("diag", F)
        with F kept in the weight's storage shape and stored like the weight (`sharding.store_like`: this rank's
        shard under FSDP2, DESIGN §16)."""
        dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
        if fisher.kind == "kfac":
            return (fisher.kind, *[t.to(self.device, dtype) for t in fisher[layer.name]])
        storage = layer.weight_matrix(fisher[layer.name].to(self.device, dtype))
        return (fisher.kind, store_like(layer.weight, storage, dtype=dtype))

    def _layer_fisher(self, layer: TrackedLayer):
        """The layer's Fisher entry as the credits take it: ("diag", F (d_out, d_in)) gathered whole when stored
        sharded (every rank calls this for the same layers in the same order), or ("kfac", f_out, f_in)."""
        entry = self.fisher_entries.get(layer.name)
        if entry is None or entry[0] != "diag":
            return entry
        return ("diag", layer.weight_matrix(full(entry[1])))

    def _delta(self, layer: TrackedLayer):
        if self.anchor is None:
            return None
        delta = self.anchor.delta(layer)
        if delta is None or layer.kind == "embedding":
            return delta  # embeddings take Δ in storage shape (vocab, d)
        return layer.weight_matrix(delta)

    def _head_gradient(self, logits, logp, targets, weights, head_rows, loss) -> torch.Tensor:
        """The head's output-gradient at the rows that predict response tokens (unfused head).

        When the model returns the head's output as its logits this is exactly w (softmax − onehot(y)), with no
        backward. A model that transforms it first gets it by autograd through that step alone.
        head_rows: the rows of a full (B·T) head output; None when the head ran on the response rows only.
        """
        head_output = self.capture.head_output
        if head_output is None or head_output is logits or not head_output.requires_grad:
            with torch.no_grad():
                g = logp.exp()  # softmax(logits): logp is already normalized
                g[torch.arange(g.shape[0], device=g.device), targets] -= 1.0
                return g.mul_(weights.unsqueeze(1).to(g.dtype))
        (grad,) = torch.autograd.grad(loss, head_output, retain_graph=True)
        g = grad.reshape(-1, grad.shape[-1])
        g = g if head_rows is None else g.index_select(0, head_rows)
        return g if g.dtype == torch.float64 else g.float()

    def _direct(self, a_rows, weight, chunks, n: int, want_seed: bool):
        """Values of the head credits g_t a_tᵀ at the rows that predict each response token, and the seed
        rows g_t W of the valuation backward (alphatoken.head)."""
        head = self.layers[0]
        batch = self.cfg.target == "batch"
        with torch.no_grad():
            hv = head_values(
                a_rows, weight, chunks, self.cfg.lr,
                direction=None if batch else self.directions.get(0),
                batch_scale=1.0 / n if batch else None,
                reduce=all_reduce_sum if batch and self._is_global() else None,
                fisher=self._layer_fisher(head), want_seed=want_seed, **self._head_drift(head, weight),
                precondition=self.preconditioners.get(head.name))
        self._check_values(hv.adaptation, hv.stability, head, hv.adaptation.new_zeros(1))
        return hv

    def _head_drift(self, head: TrackedLayer, weight: torch.Tensor) -> dict:
        """The head's drift operands: (W, W₀) to form Δ tile by tile when θ₀ sits on the weight's device,
        else Δ itself (a CPU θ₀ is copied over once, as for the body layers; a sharded θ₀ gives Δ from the
        sharded parameter, one all-gather, DESIGN §16)."""
        if self.anchor is None or head.name not in self.fisher_entries:
            return {}
        w0 = self.anchor.weights[head.name]
        if self.anchor.is_sharded(head) or w0.device != weight.device:
            delta = self._delta(head)
            return {} if delta is None else {"delta": delta}
        if not self.anchor.moved(head):
            return {}
        return {"reference": (weight, head.weight_matrix(w0))}

    def _causal(self, session: CaptureSession, seed_rows, head_rows, batch, body_rows, n: int, keep_graph: bool):
        """One valuation backward; each body layer's values at rows t as its g arrives.

        The backward starts at the head's input, with its gradient g_head W_head (`seed_rows`, from the chunked
        head) at the rows that predict response tokens: no (B, T, vocab) logit gradient and no head GEMM over
        every position.
        """
        cfg = self.cfg
        mask = batch.get("attention_mask")
        keep_rows = None if mask is None else (mask.reshape(-1, 1) > 0)  # U over non-pad rows: pads zeroed
        acc = PathValues.zeros(body_rows.numel(), body_rows.device, seed_rows.dtype)

        def on_rows(rows: LayerRows) -> None:  # under no_grad (CaptureSession)
            layer, a, g, a_all, g_all = rows.layer, rows.a, rows.g, rows.a_all, rows.g_all
            direction = self.directions.get(rows.index)
            if cfg.target == "batch":
                a_ref, g_ref = pad_zeroed(layer, a_all, g_all, keep_rows)
                direction = batch_direction(layer, a_ref, g_ref, n, self._is_global())
            fisher, delta = self._layer_fisher(layer), self._delta(layer)
            if layer.kind == "embedding":
                adapt, stab = embedding_values(a, g, cfg.lr, direction, fisher, delta)
                square_norm = credit_square_norm(None, g)
            elif layer.name in self.preconditioners:  # adaptation and credit norm in the metric P = p_out p_inᵀ
                p_out, p_in = self.preconditioners[layer.name]
                a_p, g_p = a.to(p_in.dtype) * p_in, g.to(p_out.dtype) * p_out
                adapt, _ = linear_values(a_p, g_p, cfg.lr, direction, None, None)
                _, stab = linear_values(a, g, cfg.lr, None, fisher, delta)
                square_norm = credit_square_norm(a.to(p_in.dtype) * p_in.sqrt(), g.to(p_out.dtype) * p_out.sqrt())
            else:
                adapt, stab = linear_values(a, g, cfg.lr, direction, fisher, delta)
                square_norm = credit_square_norm(a, g)
            self._check_values(adapt, stab, layer, g)
            acc.add_(adapt, stab, square_norm)

        a_head = self.capture.inputs[0]
        grad_a = torch.zeros(a_head.shape, dtype=a_head.dtype, device=a_head.device)
        grad_a.view(-1, grad_a.shape[-1]).index_copy_(0, head_rows, seed_rows.to(a_head.dtype))
        session.backward(a_head, on_rows, head_rows=head_rows, body_rows=body_rows, retain_graph=keep_graph,
                         grad_output=grad_a)
        return acc

    def _is_global(self) -> bool:
        return self.cfg.global_selection and is_distributed()

    def _rms(self, x: torch.Tensor) -> torch.Tensor:
        square_sum, count = x.double().pow(2).sum(), torch.tensor(float(x.numel()), dtype=torch.float64)
        if self._is_global():
            square_sum, count = all_reduce_sum(square_sum), all_reduce_sum(count)
        return (square_sum / count.clamp(min=1)).sqrt().to(x.dtype)

    def _rank(self, x: torch.Tensor, b, t, response) -> torch.Tensor:
        """Percentile ranks of the response tokens' values x (n,): over every rank's tokens under global selection."""
        if not self._is_global():
            return percentile_rank(x)
        full = torch.zeros(response.shape, dtype=torch.float32, device=response.device)
        full[b, t] = x.float()
        global_values, global_response, mine = gather_values(full, response)
        ranks = torch.zeros_like(global_values, dtype=torch.float64)
        ranks[global_response] = percentile_rank(global_values[global_response].double())
        return ranks[mine][b, t].to(x.dtype)

    def _combine(self, direct: "PathValues", causal: "PathValues", n: int, b, t, response, labels,
                 gap: Optional[torch.Tensor] = None, copy_loss: Optional[torch.Tensor] = None) -> TokenValues:
        """DESIGN §3: the per-path values of every response token, combined by the config's rule, then selected."""
        cfg = self.cfg
        adapt_d, adapt_c = direct.adaptation, causal.adaptation
        if cfg.leave_one_out and cfg.target == "batch":  # U without the token's own credit: ⟨C, U − C/n⟩
            adapt_d = adapt_d - cfg.lr * direct.square_norm / n
            adapt_c = adapt_c - cfg.lr * causal.square_norm / n
        parts = {"adaptation_direct": adapt_d, "adaptation_causal": adapt_c,
                 "stability_direct": direct.stability, "stability_causal": causal.stability,
                 "credit_norm_direct": direct.square_norm.clamp(min=0).sqrt(),
                 "credit_norm_causal": causal.square_norm.clamp(min=0).sqrt()}
        if gap is not None:
            parts["loss_gap"] = gap
        if copy_loss is not None:
            parts["copy_loss"] = copy_loss
        rows = combine_paths(parts, cfg, self._rms, lambda x: self._rank(x, b, t, response))
        self._check_finite(rows["total"], "the token values")
        full = {}
        for key, value in {**rows, **parts}.items():
            out = torch.zeros(response.shape, dtype=torch.float32, device=response.device)
            out[b, t] = value.float()
            full[key] = out
        mask = select_tokens(full["total"], response, cfg, protected_tokens(labels, response, cfg))
        return TokenValues(mask=mask, response=response, parts={k: full[k] for k in parts},
                           **{k: full[k] for k in rows})

    # ---------------------------------------------------------------- validation target
    def _refresh_validation(self, forward_model: Optional[nn.Module] = None) -> None:
        """U = ∇ of the mean NLL of the next validation batch, per layer, kept as factors or materialized."""
        batch = next(self.validation_batches, None)  # a bare StopIteration would silently end a caller's map()
        if batch is None:
            raise ValueError("the validation iterable yielded no batch: pass a batch dict or a non-empty list of them")
        model = forward_model if forward_model is not None else self.model  # as the step's own forward
        directions = validation_directions(self.capture, model, validate_batch(batch, self.device),
                                           self._check_finite)
        if self.retention_batches is not None:
            kept = validation_directions(self.capture, model, validate_batch(next(self.retention_batches), self.device),
                                         self._check_finite, what="retention")
            self.retention_factor = retention_scale(directions, kept, self.cfg.retention_weight,
                                                    self.cfg.retention_normalize)
            directions = with_retention(directions, kept, self.retention_factor)
        self.directions = directions

    # ---------------------------------------------------------------- errors
    def _raise_if_nonfinite(self) -> None:
        """One read of the device for every deferred check of the step; on failure, the first bad one is named
        (checked again one by one, as the immediate checks would have)."""
        flags, self._flags = self._flags, None
        if not flags or bool(torch.stack([ok for ok, _ in flags]).all()):
            return
        for ok, name in flags:
            if not bool(ok):
                name()

    def _check_finite(self, tensor: torch.Tensor, what: str, defer: bool = False) -> None:
        if defer and self.cfg.check_finite and getattr(self, "_flags", None) is not None:
            self._flags.append((torch.isfinite(tensor).all(), lambda: self._check_finite(tensor, what)))
            return
        if self.cfg.check_finite and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteError(f"AlphaToken: {bad} non-finite (NaN/Inf) entries in {what}"
                                 + _broken_weights(unwrap_model(self.model)))

    def _check_values(self, adapt, stab, layer: TrackedLayer, g) -> None:
        if not self.cfg.check_finite:
            return
        if getattr(self, "_flags", None) is not None:  # deferred: flags stay on the device until the step ends
            ok = torch.isfinite(adapt).all() & torch.isfinite(stab).all()
            g_ok = torch.isfinite(g).all()
            self._flags.append((ok, lambda: self._values_error(layer, g_ok)))
            return
        if bool(torch.isfinite(adapt).all()) and bool(torch.isfinite(stab).all()):
            return
        self._values_error(layer, torch.isfinite(g).all())

    def _values_error(self, layer: TrackedLayer, g_finite: torch.Tensor) -> None:
        if not bool(g_finite):
            raise NonFiniteError(f"AlphaToken: non-finite (NaN/Inf) output-gradient captured at layer {layer.name!r}")
        raise NonFiniteError(
            f"AlphaToken: non-finite values at layer {layer.name!r} (its input activations, Fisher entry or "
            "reference weights hold NaN/Inf)" + _broken_weights(unwrap_model(self.model))
        )


def _broken_weights(model: nn.Module) -> str:
    """Where a non-finite result comes from when the model itself is broken: the parameters holding NaN/Inf
    (looked up only once a check has failed)."""
    broken = [(name, int((~torch.isfinite(p)).sum())) for name, p in model.named_parameters()
              if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if not broken:
        return ""
    listed = ", ".join(f"{name!r} ({count} entries)" for name, count in broken[:4])
    more = f" and {len(broken) - 4} more" if len(broken) > 4 else ""
    return f"; the model's weights hold NaN/Inf: {listed}{more} (a diverged step or a bad checkpoint?)"


def _check_num_items(num_items_in_batch) -> None:
    """num_items_in_batch divides the summed loss: None, or a positive finite count."""
    if num_items_in_batch is None:
        return
    value = num_items_in_batch
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"num_items_in_batch must be one count, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"num_items_in_batch must be a positive count (the kept tokens of the accumulation "
                         f"window), or None for this batch's own count; got {num_items_in_batch!r}")
