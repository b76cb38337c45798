"""Prototype (round 11): the tuned copy's loss gap G (nats) of each kind of response token along a defaults run,
and which tokens each ranking rule would drop at the same steps (the defaults' trajectory, so the rules are
compared on the same batches and weights). Kinds: clean, the first token of a run of noise tokens, later noise.

    python benchmarks/quality/out_r11/gap_stats.py --task capitals --lr 1e-4 --seed 0
"""
import argparse
import copy
import math
import sys
from pathlib import Path

import torch

from alphatoken import realtasks as R
from alphatoken.combine import percentile_rank
from alphatoken.pretrained import load_pretrained
from alphatoken.select import protected_tokens, select_tokens
from alphatoken.tokens import token_losses

QUAL = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(QUAL))
from detect import set_trainable_blocks  # noqa: E402
import real_finetune as RF  # noqa: E402


def run_starts(noise):
    prev = torch.zeros_like(noise)
    prev[:, 1:] = noise[:, :-1]
    return noise & ~prev


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="capitals")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--taus", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0])
    a = ap.parse_args()
    torch.set_num_threads(1)
    base, tok = load_pretrained("smollm2")
    args = argparse.Namespace(keep_ratio=0.8, train_blocks=4, steps=a.steps, batch_size=8, lr=a.lr, n_train=256,
                              fisher_data="train", alphatoken_overrides={}, own_answers=None, retention=0,
                              retention_short=[], validation_retention=0, retention_answers=[])
    model = copy.deepcopy(base)
    set_trainable_blocks(model, 4)
    data = R.task_data(a.task, n_train=256, n_validation=16, n_eval=30, seed=a.seed)
    valuer = RF.build("alphatoken", model, tok, data, args, a.seed, torch.device("cpu"))
    ref = RF.tuned_reference(model, tok, data, args, a.seed, torch.device("cpu"))
    cfg = valuer.cfg
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(a.seed)
    rec = {k: [] for k in ("kind", "gap", "nll", "rho", "rank_a", "step", "ids", "cos")}
    drops = {}
    floor = cfg.loss_gap_floor  # the defaults' rule: the floor in nats (round 12: where A < 0 too), or round 9's veto
    defaults_rule = (("agree" if cfg.loss_gap_floor_agree else "nats") + f"{floor:g}") if math.isfinite(floor) else "min"
    if math.isfinite(floor) and floor not in a.taus:
        a.taus.append(floor)
    rules = ["min", "gap", "rho1"] + [f"nats{t:g}" for t in a.taus] + [f"natsmin{t:g}" for t in a.taus] + [f"agree{t:g}" for t in a.taus] + [f"hybrid{t:g}" for t in a.taus]
    model.train()
    for step in range(a.steps):
        idx = torch.randint(len(data.train), (8,), generator=gen).tolist()
        batch = R.tokenize_examples([data.train[i] for i in idx], tok)
        noise = batch.pop("noise")
        loss = valuer.value_and_loss(batch)
        tv = valuer.last_values
        resp = tv.response
        with torch.no_grad():
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            nll = token_losses(model(**inputs).logits, batch["labels"]).double()
            rho = nll - token_losses(ref(**inputs).logits, batch["labels"]).double()
        gap = tv.parts["loss_gap"].double()
        cos = tv.parts["adaptation_direct"].double() / tv.parts["credit_norm_direct"].double().clamp(min=1e-30)
        ra = torch.zeros_like(gap); ra[resp] = percentile_rank(cos[resp])
        rg = torch.zeros_like(gap); rg[resp] = percentile_rank(gap[resp])
        rr = torch.zeros_like(gap); rr[resp] = percentile_rank(rho[resp])
        values = {"min": torch.minimum(ra, rg + 0.1), "gap": rg, "rho1": rr}
        for t in a.taus:
            values[f"nats{t:g}"] = torch.where(gap < -t, rg - 1, ra)
            values[f"natsmin{t:g}"] = torch.where(gap < -t, rg - 1, torch.minimum(ra, rg + 0.1))
            values[f"agree{t:g}"] = torch.where((gap < -t) & (cos < 0), rg - 1, ra)  # round 12: both say so
            # round 12's lead: spare only a token the model already predicts (ℓ ≤ τ) whose first-order value is ≥ 0
            values[f"hybrid{t:g}"] = torch.where((gap < -t) & ((cos < 0) | (nll > t)), rg - 1, ra)
        prot = protected_tokens(batch["labels"], resp, cfg)
        starts = run_starts(noise)
        kind = torch.where(noise, torch.where(starts, 1, 2), 0)
        for r in rules:
            v = torch.where(resp, values[r], torch.zeros_like(gap)).float()
            kept = select_tokens(v, resp, cfg, prot)
            drops.setdefault(r, []).append((~kept)[resp])
        assert torch.equal(valuer.last_values.mask[resp], drops[defaults_rule][-1].logical_not()), \
            f"the rule {defaults_rule!r} is not the defaults'"
        ids = batch["labels"]
        for k, x in (("kind", kind), ("gap", gap), ("nll", nll), ("rho", rho), ("rank_a", ra), ("ids", ids), ("cos", cos)):
            rec[k].append(x[resp])
        rec["step"].append(torch.full((int(resp.sum()),), step))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
    valuer.close()
    rec = {k: torch.cat(v) for k, v in rec.items()}
    names = {0: "clean", 1: "noise run start", 2: "later noise"}
    print(f"{a.task} lr {a.lr} seed {a.seed}: {len(rec['kind'])} response tokens over {a.steps} steps")
    for k, name in names.items():
        m = rec["kind"] == k
        q = torch.quantile(rec["gap"][m], torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64))
        print(f"  {name:16s} n={int(m.sum()):5d}  ℓ(θ) {rec['nll'][m].mean():.2f}  G quantiles "
              + " ".join(f"{x:+.2f}" for x in q) + f"  Rho-1 score median {rec['rho'][m].median():+.2f}")
    from collections import Counter
    clean = rec["kind"] == 0
    for t in a.taus:
        fl = clean & (rec["gap"] < -t)
        common = Counter(tok.decode([int(i)]) for i in rec["ids"][fl]).most_common(8)
        print(f"  clean tokens with G < -{t:g}: {int(fl.sum())} ({fl.sum().item() / clean.sum().item():.3f}), "
              f"ℓ(θ) {rec['nll'][fl].mean():.2f}, Rho-1 score {rec['rho'][fl].mean():+.2f}; " + ", ".join(f"{w!r} {c}" for w, c in common))
        for k, name in ((1, "start"), (2, "later")):
            m = rec["kind"] == k
            print(f"      {name} noise with G < -{t:g}: {(m & (rec['gap'] < -t)).sum().item() / m.sum().item():.2f}")
    # round 12: the tokens the agreeing floor spares (G < −τ but A ≥ 0), by kind and by how negative the gap is
    for t in a.taus:
        spared = (rec["gap"] < -t) & (rec["cos"] >= 0)
        bins = [(-t, -5.0), (-5.0, -8.0), (-8.0, -float("inf"))] if t < 5 else [(-t, -float("inf"))]
        cells = []
        for k, name in names.items():
            counts = [int((spared & (rec["kind"] == k) & (rec["gap"] < hi) & (rec["gap"] >= lo)).sum())
                      for hi, lo in bins]
            cells.append(f"{name} " + "/".join(str(c) for c in counts))
        print(f"  spared by the agreement at τ={t:g} (G in " + ", ".join(f"[{lo:g},{hi:g})" for hi, lo in bins)
              + "): " + "; ".join(cells))
    print(f"  {'rule':10s} {'clean':>6s} {'start':>6s} {'later':>6s}  ℓ(θ) dropped noise / kept noise   overlap with rho1 / defaults")
    rho_drop = torch.cat(drops["rho1"])
    default_drop = torch.cat(drops[defaults_rule])
    for r in rules:
        d = torch.cat(drops[r])
        shares = [d[rec["kind"] == k].double().mean().item() for k in names]
        nm = rec["kind"] > 0
        print(f"  {r:10s} " + " ".join(f"{s:6.2f}" for s in shares)
              + f"  {rec['nll'][nm & d].mean():.2f} / {rec['nll'][nm & ~d].mean():.2f}"
              + f"   {(d & rho_drop).sum().item() / max(1, d.sum().item()):.2f}"
              + f" / {(d & default_drop).sum().item() / max(1, d.sum().item()):.3f}")


if __name__ == "__main__":
    main()
