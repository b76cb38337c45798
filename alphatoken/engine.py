"""AlphaToken: value every response token on adaptation and stability, on the direct and causal paths.

One call of `value(batch)`:
  1. forward with capture hooks on the tracked layers (body outputs probed when paths="full");
  2. head (direct path): g_t = w_t (softmax(logits_{t-1}) − onehot(y_t)) at the rows that predict response
     tokens — no backward; values from the head credits g_t a_tᵀ;
  3. body (causal path): one valuation backward of L = Σ_t w_t ℓ_t towards the probes (input-gradients only);
     each layer's values are computed as its g arrives, at the response rows t;
  4. combine (DESIGN §3) and select (DESIGN §4).
`value_and_loss(batch)` keeps the forward graph for the training backward of the masked loss.
"""
from __future__ import annotations

import inspect
import itertools
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sized
from typing import Callable, Optional, Union

import torch
from torch import nn

from .anchor import Anchor
from .config import AlphaTokenConfig
from .combine import PathValues, combine_paths, credit_square_norm, percentile_rank
from .credits import Direction, embedding_direction, embedding_values, linear_values, matched
from .distributed import all_reduce_sum, gather_values, is_distributed
from .fisher import Fisher
from .hooks import Capture
from .layers import TrackedLayer, discover_layers, unvalued_weights
from .losses import kept_mean_nll, masked_causal_lm_loss, response_mask
from .select import protected_tokens, select_tokens
from .values import TokenValues

TokenWeights = Union[None, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


def _accurate(x: torch.Tensor) -> torch.Tensor:
    """float32 for half types and float32; float64 stays float64 (exact checks)."""
    return x if x.dtype == torch.float64 else x.float()


class NonFiniteError(FloatingPointError):
    """NaN or Inf in the loss, a captured gradient or a value; the message names where."""


BATCH_KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "token_type_ids")


def validate_batch(batch, device) -> dict:
    """Check and move a batch: input_ids and labels (B, T) integer, attention_mask (B, T) if given."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"a batch must be a dict with input_ids and labels, got {type(batch).__name__}")
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ValueError(f"the batch has no {key!r} (keys: {sorted(batch)}); labels are -100 outside the response")
        if not isinstance(batch[key], torch.Tensor) or batch[key].dim() != 2:
            raise ValueError(f"batch[{key!r}] must be a (B, T) tensor, got {getattr(batch[key], 'shape', type(batch[key]))}")
    shape = tuple(batch["input_ids"].shape)
    out = {}
    for key, value in batch.items():
        if key in BATCH_KEYS:
            if tuple(value.shape) != shape:
                raise ValueError(f"batch[{key!r}] has shape {tuple(value.shape)} but input_ids has {shape}")
            out[key] = value.to(device)
    if out["labels"].dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be integer token ids, got {out['labels'].dtype}")
    return out


_FORWARD_ARGS: dict[type, set] = {}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The causal LM inside a DDP / accelerate / compile wrapper (the wrapper is still what runs forward)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if callable(getattr(model, "get_output_embeddings", None)):
            return model
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """The model's forward arguments: no labels (AlphaToken computes its own losses), no cache.

    With left padding and no position_ids, positions are derived from the attention mask so that a padded
    sequence is valued exactly as the unpadded one.
    """
    model = unwrap_model(model)
    cls = type(model)
    if cls not in _FORWARD_ARGS:
        params = inspect.signature(model.forward).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        _FORWARD_ARGS[cls] = set(params) | (set(BATCH_KEYS) | {"use_cache"} if takes_any else set())
    accepted = _FORWARD_ARGS[cls]
    inputs = {k: v for k, v in batch.items() if k != "labels" and k in accepted}
    mask = batch.get("attention_mask")
    if mask is not None and "position_ids" not in batch and "position_ids" in accepted and bool((mask[:, 0] == 0).any()):
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    if "use_cache" in accepted:
        inputs["use_cache"] = False
    return inputs


class AlphaToken:
    """Path-aware token valuation for a causal LM. See DESIGN.md §3–§5 and `AlphaTokenConfig`.

    model: any transformers causal LM (nn.Linear / Conv1D layers, a linear head from get_output_embeddings()).
    fisher: an `alphatoken.Fisher` over the tracked layers, or None (stability is 0, with a warning).
    reference: θ₀ for the drift term: None (snapshot now), a state dict, or a module.
    validation: a batch, or an iterable of batches cycled every `cfg.refresh` steps (target="validation").
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: Optional[AlphaTokenConfig] = None,
        fisher: Optional[Fisher] = None,
        reference=None,
        validation=None,
    ):
        self.model = model  # what runs forward (possibly a DDP / accelerate wrapper)
        self.cfg = cfg = cfg or AlphaTokenConfig()
        if not isinstance(cfg, AlphaTokenConfig):
            raise TypeError(f"cfg must be an AlphaTokenConfig, got {type(cfg).__name__}")
        self.layers: list[TrackedLayer] = discover_layers(unwrap_model(model), cfg.tracked_layers, cfg.track_embeddings)
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
                entry = fisher[layer.name]
                entry = (entry,) if fisher.kind == "diag" else entry
                dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
                self.fisher_entries[layer.name] = (fisher.kind, *[t.to(self.device, dtype) for t in entry])
            self.anchor = Anchor(self.layers, reference, cfg.reference_device, cfg.reference_dtype)
        if cfg.target == "auto":
            self.cfg = cfg = cfg.replace(target="validation" if validation is not None else "none")
            if validation is None:
                warnings.warn(
                    "AlphaToken: no validation batch, so adaptation is 0 and tokens are ranked by stability alone "
                    + ("(and without a Fisher every value is 0, so selection keeps tokens by position). " if fisher is None
                       else "") + "For the recommended setting pass validation=<a few clean target-task examples>; "
                    "target='batch' needs no extra data but ranks noise above clean tokens in benchmarks/quality "
                    "(DESIGN §3.5)", stacklevel=2)
        self.validation_batches = None
        self.directions: dict[int, Direction] = {}
        if cfg.target == "validation":
            if validation is None:
                raise ValueError('target="validation" needs validation=<batch or iterable of batches>')
            batches = [validation] if isinstance(validation, Mapping) else validation
            if not isinstance(batches, Iterable):
                raise TypeError("validation must be a batch dict or an iterable of batch dicts")
            if isinstance(batches, Sized) and len(batches) == 0:
                raise ValueError("validation is empty: pass a batch dict or a non-empty list of batch dicts")
            self.validation_batches = itertools.cycle(batches)
        self.capture = Capture(self.layers)
        self.steps = 0
        self.last_values: Optional[TokenValues] = None
        self.last_logits: Optional[torch.Tensor] = None
        self.closed = False

    # ---------------------------------------------------------------- public surface
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
        values, _, _ = self._run(batch, token_weights, keep_graph=False, forward_model=forward_model)
        self.last_values = values
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

        Default loss: mean next-token NLL over the kept tokens (sum / num_items_in_batch when given).
        `loss_fn(logits, masked_labels)` replaces it. The TokenValues of the batch are kept in
        `self.last_values` (and the logits in `self.last_logits`) for logging.
        """
        _check_num_items(num_items_in_batch)
        values, logits, nll = self._run(batch, token_weights, keep_graph=True, forward_model=forward_model)
        labels = values.apply(batch["labels"].to(values.mask.device))
        self.last_values, self.last_logits = values, logits
        if loss_fn is not None:
            return loss_fn(logits, labels)
        if nll is None:  # no response token: a zero loss that still backpropagates
            return masked_causal_lm_loss(logits, labels, num_items_in_batch)
        # the valuation's own per-token NLL (graph kept), at the kept tokens: no second log-softmax
        return kept_mean_nll(nll, values.mask[values.response], num_items_in_batch, logits)

    def close(self) -> None:
        """Remove every hook and drop captured state (idempotent)."""
        self.capture.remove()
        self.closed = True

    def __enter__(self) -> "AlphaToken":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- one step
    def _run(self, batch, token_weights: TokenWeights, keep_graph: bool, forward_model=None):
        if self.closed:
            raise RuntimeError("this AlphaToken was closed; create a new one")
        cfg = self.cfg
        batch = validate_batch(batch, self.device)
        labels = batch["labels"]
        response = response_mask(labels)
        B, T = labels.shape
        if self.validation_batches is not None and self.steps % cfg.refresh == 0:
            self._refresh_validation()
        self.steps += 1

        body = cfg.paths == "full" and len(self.layers) > 1
        n = int(response.sum())
        if self._is_global():  # every rank takes the same branches and joins every collective, in order
            n = int(all_reduce_sum(n))
        model = forward_model if forward_model is not None else self.model
        self.capture.open(set(range(1, len(self.layers))) if body and n > 0 else set())
        try:
            with torch.enable_grad():  # graph kept for the body backward, the masked loss, or a logit transform
                logits = model(**model_inputs(model, batch)).logits
        finally:
            self.capture.close_recording()
        try:
            if n == 0:
                return self._empty(response), logits, None
            b, t = response.nonzero(as_tuple=True)
            head_rows, body_rows = b * T + t - 1, b * T + t
            logp_graph, nll_graph = self._nll_with_graph(logits, labels, b, t)
            logp, nll = logp_graph.detach(), nll_graph.detach()
            self._check_finite(nll, "the loss (per-token NLL of the response tokens)")
            weights = self._weights(token_weights, nll, b, t, (B, T))
            with torch.enable_grad():
                loss = (weights * nll_graph).sum()
            g_head = self._head_gradient(logits, logp, labels[b, t], weights, head_rows, loss)
            direct = self._direct(g_head, head_rows, n)
            causal = PathValues.zeros_like(direct)
            if body:
                causal = self._causal(g_head, head_rows, batch, body_rows, n, keep_graph)
            values = self._combine(direct, causal, n, b, t, response, labels)
            return values, logits, nll_graph
        finally:
            self.capture.release()

    def _empty(self, response: torch.Tensor) -> TokenValues:
        zero = torch.zeros(response.shape, dtype=torch.float32, device=response.device)
        return TokenValues(zero, zero.clone(), zero.clone(), zero.clone(), zero.clone(),
                           torch.zeros_like(response), response)

    @staticmethod
    def _nll_with_graph(logits, labels, b, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs (n, V), NLL (n,)) of the response tokens (b, t) from logits[b, t − 1], in the graph
        (also when the caller is under torch.no_grad: the valuation backward needs it)."""
        with torch.enable_grad():
            logp = torch.log_softmax(_accurate(logits[b, t - 1]), dim=-1)
            return logp, -logp.gather(1, labels[b, t].unsqueeze(1)).squeeze(1)

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
    def _layer_fisher(self, layer: TrackedLayer):
        return self.fisher_entries.get(layer.name)

    def _delta(self, layer: TrackedLayer):
        if self.anchor is None:
            return None
        delta = self.anchor.delta(layer)
        if delta is None or layer.kind == "embedding":
            return delta  # embeddings take Δ in storage shape (vocab, d)
        return layer.weight_matrix(delta)

    def _head_gradient(self, logits, logp, targets, weights, head_rows, loss) -> torch.Tensor:
        """The head's output-gradient at the rows that predict response tokens.

        When the model returns the head's output as its logits (the usual case) this is exactly
        w (softmax − onehot(y)), with no backward. A model that transforms it first (final-logit soft-capping,
        logit scaling) gets it by autograd through that step alone: a few elementwise ops.
        """
        head_output = self.capture.head_output
        if head_output is None or head_output is logits or not head_output.requires_grad:
            with torch.no_grad():
                g = logp.exp()  # softmax(logits): logp is already normalized
                g[torch.arange(g.shape[0], device=g.device), targets] -= 1.0
                return g * weights.unsqueeze(1).to(g.dtype)
        (grad,) = torch.autograd.grad(loss, head_output, retain_graph=True)
        g = grad.reshape(-1, grad.shape[-1]).index_select(0, head_rows)
        return g if g.dtype == torch.float64 else g.float()

    def _direct(self, g, head_rows, n: int):
        """Values of the head credits g_t a_tᵀ at the rows that predict each response token."""
        head = self.layers[0]
        with torch.no_grad():
            a = self.capture.inputs[0]
            a = a.reshape(-1, a.shape[-1]).index_select(0, head_rows)
            if self.cfg.target == "batch":
                direction = self._batch_direction(head, a, g, n)
            else:
                direction = self.directions.get(0)
            adapt, stab = linear_values(a, g, self.cfg.lr, direction, self._layer_fisher(head), self._delta(head))
            square_norm = credit_square_norm(a, g)
        self._check_values(adapt, stab, head, g)
        return PathValues(adapt, stab, square_norm)

    def _causal(self, g_head, head_rows, batch, body_rows, n: int, keep_graph: bool):
        """One valuation backward; each body layer's values at rows t as its g arrives.

        The backward starts at the head's input, with its gradient g_head W_head at the rows that predict
        response tokens (the head's output-gradient is already known): no (B, T, vocab) logit gradient and no
        head GEMM over every position.
        """
        cfg = self.cfg
        mask = batch.get("attention_mask")
        padded = mask is not None and not bool(mask.all())
        ref_rows = (mask.reshape(-1) > 0).nonzero().squeeze(1) if padded else None  # None: every row, no copy
        acc = PathValues.zeros(body_rows.numel(), body_rows.device, g_head.dtype)

        @torch.no_grad()
        def on_grad(index: int, grad: torch.Tensor) -> None:
            layer = self.layers[index]
            g_all = grad.reshape(-1, grad.shape[-1])
            x = self.capture.inputs[index]
            a_all = x.reshape(-1) if layer.kind == "embedding" else x.reshape(-1, x.shape[-1])
            if a_all.shape[0] != g_all.shape[0] or g_all.shape[0] != batch["input_ids"].numel():
                raise ValueError(
                    f"unsupported tracked module {layer.name!r}: its rows ({a_all.shape[0]}) do not map to the "
                    f"batch's (B, T) positions; exclude it with AlphaTokenConfig(tracked_layers=<regex>)"
                )
            a, g = a_all.index_select(0, body_rows), g_all.index_select(0, body_rows)
            direction = self.directions.get(index)
            if cfg.target == "batch":
                a_ref = a_all if ref_rows is None else a_all.index_select(0, ref_rows)
                g_ref = g_all if ref_rows is None else g_all.index_select(0, ref_rows)
                direction = self._batch_direction(layer, a_ref, g_ref, n)
            fisher, delta = self._layer_fisher(layer), self._delta(layer)
            if layer.kind == "embedding":
                adapt, stab = embedding_values(a, g, cfg.lr, direction, fisher, delta)
                square_norm = credit_square_norm(None, g)
            else:
                adapt, stab = linear_values(a, g, cfg.lr, direction, fisher, delta)
                square_norm = credit_square_norm(a, g)
            self._check_values(adapt, stab, layer, g)
            acc.add_(adapt, stab, square_norm)

        head = self.layers[0]
        a_head = self.capture.inputs[0]
        weight = head.weight_matrix().detach()  # (vocab, d)
        grad_rows = g_head.to(weight.dtype) @ weight
        grad_a = torch.zeros(a_head.shape, dtype=a_head.dtype, device=a_head.device)
        grad_a.view(-1, grad_a.shape[-1]).index_copy_(0, head_rows, grad_rows.to(a_head.dtype))
        self.capture.backward(a_head, on_grad, retain_graph=keep_graph, grad_output=grad_a)
        return acc

    def _is_global(self) -> bool:
        return self.cfg.global_selection and is_distributed()

    def _batch_direction(self, layer: TrackedLayer, a_ref, g_ref, n: int) -> Direction:
        """U = (1/n) Σ_s g_s a_sᵀ over this batch's rows — over all ranks' rows under global selection."""
        if layer.kind == "embedding":
            direction = embedding_direction(a_ref, g_ref, layer.shape[1], 1.0 / n)
        elif self._is_global():  # always materialized: the ranks' sums add up
            a_ref, g_ref = matched(a_ref, g_ref)
            local = g_ref.T @ a_ref
            direction = Direction(matrix=local if local.dtype == torch.float64 else local.float(), scale=1.0 / n)
        else:
            return Direction.from_rows(a_ref, g_ref, 1.0 / n)
        if self._is_global():  # n is already the global count
            direction.matrix = all_reduce_sum(direction.matrix)
        return direction

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

    def _combine(self, direct: "PathValues", causal: "PathValues", n: int, b, t, response, labels) -> TokenValues:
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
    def _refresh_validation(self) -> None:
        """U = ∇ of the mean NLL of the next validation batch, per layer, kept as factors or materialized."""
        batch = next(self.validation_batches, None)  # a bare StopIteration would silently end a caller's map()
        if batch is None:
            raise ValueError("the validation iterable yielded no batch: pass a batch dict or a non-empty list of them")
        batch = validate_batch(batch, self.device)
        labels = batch["labels"]
        response = response_mask(labels)
        n = int(response.sum())
        if n == 0:
            raise ValueError("the validation batch has no response tokens (every label is -100)")
        B, T = labels.shape
        b, t = response.nonzero(as_tuple=True)
        head_rows = b * T + t - 1
        mask = batch.get("attention_mask")
        body_rows = (mask.reshape(-1) > 0).nonzero().squeeze(1) if mask is not None else torch.arange(B * T, device=self.device)
        self.capture.open(set(range(len(self.layers))))
        try:
            with torch.enable_grad():
                logits = self.model(**model_inputs(self.model, batch)).logits
        finally:
            self.capture.close_recording()
        directions: dict[int, Direction] = {}

        @torch.no_grad()
        def on_grad(index: int, grad: torch.Tensor) -> None:
            layer = self.layers[index]
            rows = head_rows if layer.is_head else body_rows
            x = self.capture.inputs[index]
            a = (x.reshape(-1) if layer.kind == "embedding" else x.reshape(-1, x.shape[-1])).index_select(0, rows)
            g = grad.reshape(-1, grad.shape[-1]).index_select(0, rows)
            self._check_finite(g, f"the validation output-gradient of layer {layer.name!r}")
            if layer.kind == "embedding":
                directions[index] = embedding_direction(a, g, layer.shape[1], 1.0 / n)
            else:
                directions[index] = Direction.from_rows(a.detach().clone(), g.detach().clone(), 1.0 / n)

        try:
            with torch.enable_grad():
                loss = self._nll_with_graph(logits, labels, b, t)[1].sum()
            self._check_finite(loss, "the validation loss")
            self.capture.backward(loss, on_grad, retain_graph=False)
        finally:
            self.capture.release()
        self.directions = directions

    # ---------------------------------------------------------------- errors
    def _check_finite(self, tensor: torch.Tensor, what: str) -> None:
        if self.cfg.check_finite and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteError(f"AlphaToken: {bad} non-finite (NaN/Inf) entries in {what}"
                                 + _broken_weights(unwrap_model(self.model)))

    def _check_values(self, adapt, stab, layer: TrackedLayer, g) -> None:
        if not self.cfg.check_finite:
            return
        if bool(torch.isfinite(adapt).all()) and bool(torch.isfinite(stab).all()):
            return
        if not bool(torch.isfinite(g).all()):
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
