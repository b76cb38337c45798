"""Float64 brute force for token values (DESIGN §3), independent of the engine's code paths.

* U_l: autograd of the mean loss with respect to each weight (weights untied in the models used here);
* direct credits: per-token head gradients ∇_{W_head} ℓ_t from a separate backward of ℓ_t alone;
* causal credits: g_{l,t} a_{l,t}ᵀ from tensors captured with plain hooks and `retain_grad`;
* stability: −[R(W − ηC) − R(W)] with R = ½ ⟨F, (W − W⁰)²⟩ evaluated explicitly, F built in full.
"""
from __future__ import annotations

import torch
from torch import nn

from transformers.pytorch_utils import Conv1D


def as_matrix(module: nn.Module, weight_like: torch.Tensor) -> torch.Tensor:
    """(d_out, d_in) orientation of a weight-shaped tensor."""
    return weight_like.t() if isinstance(module, Conv1D) else weight_like


def nll_per_token(logits, labels):
    resp = labels != -100
    resp[:, 0] = False
    b, t = resp.nonzero(as_tuple=True)
    logp = torch.log_softmax(logits[b, t - 1], dim=-1)
    return -logp.gather(1, labels[b, t].unsqueeze(1)).squeeze(1), b, t


def floor_between(gap: torch.Tensor, k: int) -> float:
    """A loss-gap floor τ halfway between the k-th and (k+1)-th most negative gaps: exactly k tokens have G < −τ,
    and none sits at the threshold."""
    magnitudes = torch.sort(-gap[gap < 0], descending=True).values  # largest first
    assert magnitudes.numel() > k >= 1, (magnitudes.numel(), k)
    return float((magnitudes[k - 1] + magnitudes[k]) / 2)


def forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False).logits


def capture_credits(model, batch, names):
    """Inputs a (B, T, d_in) and output-gradients g = ∂L_sum/∂z (B, T, d_out) of the named modules."""
    modules = dict(model.named_modules())
    store, handles = {}, []
    for name in names:
        def hook(mod, args, out, name=name):
            out.retain_grad()
            store[name] = (args[0].detach(), out)
        handles.append(modules[name].register_forward_hook(hook))
    try:
        logits = forward(model, batch)
        nll, _, _ = nll_per_token(logits, batch["labels"])
        nll.sum().backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return {name: (a, out.grad.detach()) for name, (a, out) in store.items()}


def target_gradients(model, batch, names):
    """U_l = ∇_{W_l} of the mean NLL over the batch's response tokens, as (d_out, d_in)."""
    modules = dict(model.named_modules())
    logits = forward(model, batch)
    nll, _, _ = nll_per_token(logits, batch["labels"])
    grads = torch.autograd.grad(nll.mean(), [modules[n].weight for n in names])
    return {n: as_matrix(modules[n], g) for n, g in zip(names, grads)}


def head_token_gradients(model, batch, head_name):
    """∇_{W_head} ℓ_t for every response token, each from its own backward (N, d_out, d_in)."""
    head = dict(model.named_modules())[head_name]
    logits = forward(model, batch)
    nll, b, t = nll_per_token(logits, batch["labels"])
    per_token = [torch.autograd.grad(nll[i], head.weight, retain_graph=True)[0] for i in range(nll.numel())]
    return torch.stack([as_matrix(head, g) for g in per_token]), b, t


def stability_of(C, W, W0, F, eta):
    """−[R(W − ηC) − R(W)], R(W) = ½ ⟨F, (W − W⁰)²⟩, all (d_out, d_in)."""
    def R(x):
        return 0.5 * (F * (x - W0) ** 2).sum()
    return -(R(W - eta * C) - R(W))


def brute_values(model, batch, head_name, body_names, eta=1.0, lam=1.0, gamma=1.0, fisher=None, reference=None,
                 target=None):
    """Every field of TokenValues (B, T) in float64. fisher/reference: dict name -> (d_out, d_in) tensors.

    target: dict name -> U (d_out, d_in); default: the batch's own mean-loss gradient.
    """
    modules = dict(model.named_modules())
    names = [head_name] + list(body_names)
    U = target if target is not None else target_gradients(model, batch, names)
    head_grads, b, t = head_token_gradients(model, batch, head_name)
    credits = capture_credits(model, batch, body_names)
    B, T = batch["labels"].shape
    fields = {k: torch.zeros(B, T, dtype=torch.float64) for k in ("ad", "sd", "ac", "sc")}

    def weights(name):
        W = as_matrix(modules[name], modules[name].weight.detach())
        W0 = as_matrix(modules[name], reference[name]) if reference is not None else W
        return W, W0

    for i in range(len(b)):
        bi, ti = b[i], t[i]
        C = head_grads[i]
        fields["ad"][bi, ti] = eta * (C * U[head_name]).sum()
        if fisher is not None:
            W, W0 = weights(head_name)
            fields["sd"][bi, ti] = stability_of(C, W, W0, fisher[head_name], eta)
        for name in body_names:
            a, g = credits[name]
            C = torch.outer(g[bi, ti], a[bi, ti])
            fields["ac"][bi, ti] += eta * (C * U[name]).sum()
            if fisher is not None:
                W, W0 = weights(name)
                fields["sc"][bi, ti] += stability_of(C, W, W0, fisher[name], eta)
    out = {
        "adaptation": fields["ad"] + gamma * fields["ac"],
        "stability": fields["sd"] + gamma * fields["sc"],
        "direct": fields["ad"] + lam * fields["sd"],
        "causal": fields["ac"] + lam * fields["sc"],
    }
    out["total"] = out["direct"] + gamma * out["causal"]
    return out


def brute_fisher(model, batch, names):
    """Token-level diag Fisher with data labels: (1/N) Σ_s (g_s a_sᵀ)², g from the summed response NLL."""
    credits = capture_credits(model, batch, names)
    n = int(((batch["labels"] != -100)[:, 1:]).sum())
    out = {}
    for name in names:
        a, g = credits[name]
        a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
        out[name] = sum(torch.outer(g2[s], a2[s]) ** 2 for s in range(a2.shape[0])) / n
    return out
