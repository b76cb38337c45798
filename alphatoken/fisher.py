"""The reference Fisher at θ₀ (DESIGN §5): estimated with the capture hooks, stored with safetensors.

Token-level Fisher of layer l:  F_l = (1/N) Σ_s (g_s ⊙ g_s)(a_s ⊙ a_s)ᵀ   (d_out, d_in)
"kfac" keeps the factors        f_out = (1/N) Σ_s g_s ⊙ g_s,  f_in = (1/N) Σ_s a_s ⊙ a_s,  F_l ≈ f_out f_inᵀ
with g from the summed NLL of the response tokens (labels sampled from the model, or the data's), N the
number of response tokens, and s over the positions where g can be non-zero: the rows that predict a
response token at the head, every non-padding position in the body (prompt positions carry gradient too).
"""
from __future__ import annotations

import json
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .batch import model_inputs, nonpad_rows, response_mask, response_rows, unwrap_model, validate_batch
from .distributed import all_reduce_sum, is_distributed
from .hooks import Capture
from .layers import TrackedLayer, discover_layers
from .progress import progress
from .sharding import is_sharded
from .tokens import accurate

KINDS = ("diag", "kfac")
FORMAT = "alphatoken-fisher-v1"


def _check_entries(name: str, value) -> None:
    """A Fisher is an average of squares: every entry finite and >= 0 (a negative one would reward drift)."""
    parts = zip((" f_out", " f_in"), value) if isinstance(value, tuple) else [("", value)]
    for part, t in parts:
        if not t.is_floating_point():
            raise ValueError(f"Fisher entry {name!r}{part} must be a floating tensor, got {t.dtype}")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"Fisher entry {name!r}{part} has {bad} non-finite (NaN/Inf) entries; re-estimate it "
                             "with at.estimate_fisher")
        negative = int((t < 0).sum())
        if negative:
            raise ValueError(f"Fisher entry {name!r}{part} has {negative} negative entries (min {float(t.min()):.3g}); "
                             "a Fisher is an average of squares, >= 0 everywhere (re-estimate it, or clamp(min=0))")


class Fisher:
    """A reference Fisher keyed by module name: (d_out, d_in) for "diag", (f_out, f_in) pairs for "kfac"."""

    def __init__(self, kind: str, tensors: dict, meta: Optional[dict] = None):
        if kind not in KINDS:
            raise ValueError(f"Fisher kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.tensors: dict = {}
        for name, value in tensors.items():
            if kind == "diag":
                if not isinstance(value, torch.Tensor) or value.dim() != 2:
                    raise ValueError(f"diag Fisher for {name!r} must be a (d_out, d_in) tensor")
            else:
                if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(v.dim() == 1 for v in value)):
                    raise ValueError(f"kfac Fisher for {name!r} must be a pair (f_out (d_out,), f_in (d_in,))")
                value = tuple(value)
            _check_entries(name, value)
            self.tensors[name] = value
        self.meta = dict(meta or {})

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str):
        return self.tensors[name]

    def names(self) -> list[str]:
        return list(self.tensors)

    def check_layers(self, layers: list[TrackedLayer]) -> None:
        """Every tracked layer must have an entry of its (d_out, d_in) shape."""
        missing = [layer.name for layer in layers if layer.name not in self.tensors]
        if missing:
            raise ValueError(
                f"the Fisher has no entry for tracked layers {missing[:4]}{'...' if len(missing) > 4 else ''}; "
                "estimate it with the same tracked_layers / track_embeddings settings as the valuer"
            )
        for layer in layers:
            d_out, d_in = layer.shape
            value = self.tensors[layer.name]
            got = tuple(value.shape) if self.kind == "diag" else (value[0].numel(), value[1].numel())
            if got != (d_out, d_in):
                raise ValueError(f"Fisher entry {layer.name!r} has shape {got}, the layer is (d_out, d_in)={(d_out, d_in)}")

    def to(self, device=None, dtype=None) -> "Fisher":
        def move(t):
            return t.to(device=device, dtype=dtype or t.dtype)

        if self.kind == "diag":
            tensors = {k: move(v) for k, v in self.tensors.items()}
        else:
            tensors = {k: (move(v[0]), move(v[1])) for k, v in self.tensors.items()}
        return Fisher(self.kind, tensors, self.meta)

    def save(self, path: str) -> None:
        """Write the Fisher with safetensors; the metadata holds the sha256 of the tensors (`tensor_digest`),
        which `load` checks."""
        from safetensors.torch import save_file

        flat = {}
        for name, value in self.tensors.items():
            if self.kind == "diag":
                flat[name] = value.detach().contiguous().cpu()
            else:
                flat[f"{name}::f_out"] = value[0].detach().contiguous().cpu()
                flat[f"{name}::f_in"] = value[1].detach().contiguous().cpu()
        meta = {"format": FORMAT, "kind": self.kind, "meta": json.dumps(self.meta), "sha256": tensor_digest(flat)}
        save_file(flat, path, metadata=meta)

    @classmethod
    def load(cls, path: str, device: Union[str, torch.device] = "cpu") -> "Fisher":
        """Read a Fisher written by `save`. ValueError naming the file when it is not one, is damaged (its
        tensors' sha256 differs from the one saved with them) or lacks a kfac factor."""
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path} is not an AlphaToken Fisher file (format={meta.get('format')!r})")
                kind = meta.get("kind")
                raw = {key: f.get_tensor(key) for key in f.keys()}
        except ValueError:
            raise
        except OSError:
            raise
        except Exception as err:  # safetensors' errors for a damaged header or a truncated file
            raise ValueError(f"{path}: damaged Fisher file ({type(err).__name__}: {err})") from None
        if kind not in KINDS:
            raise ValueError(f"{path}: damaged Fisher file (kind {kind!r} is not one of {KINDS})")
        digest = meta.get("sha256")
        if digest is not None and tensor_digest(raw) != digest:
            raise ValueError(f"{path}: damaged Fisher file (the sha256 of its tensors differs from the one saved "
                             "with them); estimate the Fisher again")
        try:
            extra = json.loads(meta.get("meta", "{}"))
        except ValueError as err:
            raise ValueError(f"{path}: damaged Fisher file (its metadata is not JSON: {err})") from None
        if kind == "diag":
            tensors = raw
        else:
            names = sorted({key.rsplit("::", 1)[0] for key in raw})
            tensors = {}
            for n in names:
                missing = [part for part in ("f_out", "f_in") if f"{n}::{part}" not in raw]
                if missing:
                    raise ValueError(f"{path}: the kfac Fisher of layer {n!r} lacks its {' and '.join(missing)} "
                                     "factor; estimate the Fisher again")
                tensors[n] = (raw[f"{n}::f_out"], raw[f"{n}::f_in"])
        try:
            fisher = cls(kind, tensors, extra)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        return fisher.to(device=device) if str(device) != "cpu" else fisher

    def __repr__(self) -> str:
        return f"Fisher(kind={self.kind!r}, layers={len(self.tensors)})"


def tensor_digest(tensors: dict) -> str:
    """sha256 over the named tensors (name, dtype, shape and bytes, in name order): what `Fisher.save` stores
    and `Fisher.load` checks."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _acc_dtype(acc) -> torch.dtype:
    return acc.dtype if isinstance(acc, torch.Tensor) else acc[0].dtype


@torch.no_grad()
def _accumulate(kind, acc, layer, a, g):
    if layer.kind == "embedding":  # a holds token ids; a ⊙ a is their one-hot
        d, vocab = layer.shape
        g2 = g.to(_acc_dtype(acc)) ** 2
        if kind == "diag":
            acc.index_add_(1, a, g2.T)  # acc (d, vocab)
        else:
            acc[0].add_(g2.sum(0))
            acc[1].index_add_(0, a, torch.ones_like(a, dtype=acc[1].dtype))
        return
    a2, g2 = a.to(_acc_dtype(acc)) ** 2, g.to(_acc_dtype(acc)) ** 2
    if kind == "diag":
        acc.addmm_(g2.T, a2)
    else:
        acc[0].add_(g2.sum(0))
        acc[1].add_(a2.sum(0))


def estimate_fisher(
    model: nn.Module,
    batches: Iterable[dict],
    kind: str = "diag",
    labels: str = "model",
    tracked_layers: Union[str, int] = "all",
    track_embeddings: bool = False,
    max_batches: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    progress_bar: Optional[bool] = None,
    **kwargs,
) -> Fisher:
    """Estimate the token-level reference Fisher of every tracked layer at the model's current weights (θ₀).

    batches: dicts with input_ids, labels (-100 outside the response) and optionally attention_mask.
    labels: "model" samples each response label from the model's own distribution (the true Fisher);
        "data" uses the batch labels (the empirical Fisher).
    Parameters' `.grad` are never touched. `progress` / `progress_bar` shows a bar (default: on a terminal).
    On an FSDP2-sharded model each rank passes its own batches (the same number on every rank) and gets the Fisher
    of all ranks' batches, summed over ranks: the same on every rank, as one process would estimate it from them
    (the accumulators are whole-size while estimating; the valuer keeps a diag entry's shard). Elsewhere (one
    process, DDP) each process estimates from its own batches.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if labels not in ("model", "data"):
        raise ValueError(f"labels must be 'model' or 'data', got {labels!r}")
    show = kwargs.pop("progress", progress_bar)
    if kwargs:
        raise TypeError(f"estimate_fisher() got unexpected arguments {sorted(kwargs)}")
    layers = discover_layers(unwrap_model(model), tracked_layers, track_embeddings)
    device = next(model.parameters()).device
    sharded = is_distributed() and any(is_sharded(layer.weight) for layer in layers)  # FSDP2 (DESIGN §16)
    acc = _zero_accumulators(layers, kind, device)
    capture = Capture(layers)
    n_tokens = 0
    try:
        for step, batch in enumerate(progress(batches, desc="Fisher", enabled=show)):
            if max_batches is not None and step >= max_batches:
                break
            n_tokens += _accumulate_batch(model, validate_batch(batch, device), capture, layers, acc, kind, labels,
                                          generator, sharded)
    finally:
        capture.remove()
    if sharded:  # the Fisher of all ranks' batches, the same on every rank (the valuer then keeps its shard)
        n_tokens = int(all_reduce_sum(n_tokens))
        _sum_over_ranks(acc)
    if n_tokens == 0:
        raise ValueError("estimate_fisher: the batches hold no response tokens (every label is -100)")
    tensors = {}
    for i, layer in enumerate(layers):
        if kind == "diag":
            tensors[layer.name] = acc[i] / n_tokens
        else:
            tensors[layer.name] = (acc[i][0] / n_tokens, acc[i][1] / n_tokens)
    return Fisher(kind, tensors, {"n_tokens": n_tokens, "labels": labels})


def _zero_accumulators(layers, kind: str, device) -> dict:
    """{layer index: zeros}: the (d_out, d_in) diagonal, or the (d_out,), (d_in,) K-FAC pair; float64 layers
    accumulate in float64 (exact checks), the rest in float32."""
    acc: dict[int, object] = {}
    for i, layer in enumerate(layers):
        d_out, d_in = layer.shape
        dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32  # float64: exact checks
        if kind == "diag":
            acc[i] = torch.zeros(d_out, d_in, dtype=dtype, device=device)
        else:
            acc[i] = (torch.zeros(d_out, dtype=dtype, device=device), torch.zeros(d_in, dtype=dtype, device=device))
    return acc


def _accumulate_batch(model, batch: dict, capture, layers, acc: dict, kind: str, labels: str, generator,
                      sharded: bool) -> int:
    """Add one batch's per-token squared gradients into `acc`; the number of response tokens it held.

    labels "model" samples each target from the model's distribution, "data" takes the batch's labels. A batch
    without response tokens (on every rank, when sharded) is skipped.
    """
    resp = response_mask(batch["labels"])
    n = int(resp.sum())
    if (all_reduce_sum(n) if sharded else n) == 0:  # FSDP2: every rank runs the same forwards (collectives)
        return 0
    rows = response_rows(resp)
    with capture.session(set(range(len(layers))), resp.numel()) as session:
        logits = session.forward(model, model_inputs(model, batch))
        logit_rows = accurate(logits[rows.b, rows.t - 1])
        if labels == "model" and n > 0:  # (n = 0: a rank of a sharded model joining the others' forward)
            with torch.no_grad():
                target = torch.multinomial(torch.softmax(logit_rows, -1), 1, generator=generator).squeeze(1)
        else:
            target = batch["labels"][rows.b, rows.t]
        loss = torch.nn.functional.cross_entropy(logit_rows, target, reduction="sum")
        session.backward(loss, lambda r: _accumulate(kind, acc[r.index], r.layer, r.a, r.g),
                         head_rows=rows.head, body_rows=nonpad_rows(batch), retain_graph=False)
    return n


def _sum_over_ranks(acc: dict) -> None:
    """Replace every accumulator (tensor or K-FAC pair) by its sum over the ranks."""
    for i in acc:
        parts = acc[i] if isinstance(acc[i], tuple) else (acc[i],)
        reduced = tuple(all_reduce_sum(t) for t in parts)
        acc[i] = reduced if isinstance(acc[i], tuple) else reduced[0]
