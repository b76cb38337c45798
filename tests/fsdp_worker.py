"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2` on CPU (gloo) as `fsdp_worker.py OUT LAYOUT`:
FSDP2 (`fully_shard` on every decoder layer, then the head's unit by LAYOUT (see `_shard`), then the root) on
float64 tiny Llamas, untied and tied head, kfac and diag Fisher.

Every rank holds its block of a global batch (its rows, trimmed to its own length). Per case, three masked
training steps run side by side: the sharded model (global selection, loss Σ_kept ℓ / N_global · world, which
FSDP's gradient average turns into Σ_all kept ℓ / N_global) and one process on the whole batch (the same loss).
Written to <out>/fsdp_<case>_rank<r>.pt, per step: whether the mask equals the single-process block, the largest
relative error of adaptation / stability / total, whether θ₀ has moved (drift live), the weights' largest
difference after the step; the bytes of θ₀ and of the Fisher this rank holds and those of the single process; and
a checkpoint round trip (torch.distributed.checkpoint of the model, the optimizer and `Anchor.state_dict()`, loaded
into a fresh sharded model and valuer) giving the same next values and step.
"""
import copy
import os
import sys
import warnings

import torch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().clamp(min=1e-30)
    return float((a - b).abs().max() / scale)


def _flat(entry) -> torch.Tensor:
    """A Fisher entry (diag tensor or kfac pair) as one flat tensor."""
    return torch.cat([x.flatten() for x in entry]) if isinstance(entry, tuple) else entry.flatten()


def _block(batch: dict, rows: slice) -> dict:
    """Rows of the global batch, trimmed to their own longest sequence (the ranks' T differ)."""
    mask = batch["attention_mask"][rows]
    T = int(mask.sum(1).max())
    return {k: v[rows, :T].contiguous() for k, v in batch.items()}


def _ragged_batch(seed: int, per: int) -> dict:
    """A (4, 10) batch, rows sorted longest first, from the first seed at or after `seed` whose last rank's rows are
    shorter than the first rank's (so the ranks' trimmed T differ)."""
    from models import random_batch

    while True:
        batch = random_batch(seed, B=4, T=10)
        order = batch["attention_mask"].sum(1).argsort(descending=True, stable=True)
        batch = {k: v[order] for k, v in batch.items()}
        lengths = batch["attention_mask"].sum(1)
        if int(lengths[-per:].max()) < int(lengths[:per].max()):
            return batch
        seed += 1


def _kept_logits_rel(vs, v1, rank: int, world: int) -> float:
    """`kept_logit_chunks` after a step (TRL's metrics read it; FSDP2 has resharded the head by then): this rank's
    kept rows' logits against the single process's rows of the same block (its kept rows come in batch-row order,
    so rank 0's block leads and the last rank's ends the list). Relative error; 0 rows on both sides give 0."""
    got = [z for z, _ in vs.kept_logit_chunks(chunk_rows=3)]  # collective under FSDP2: every rank calls it
    want = torch.cat([z for z, _ in v1.kept_logit_chunks()])
    got = torch.cat(got) if got else want[:0]
    k = got.shape[0]
    block = want[:k] if rank == 0 else want[want.shape[0] - k:]
    assert world == 2, "the block offsets above assume two ranks"
    return _rel(got, block) if k else 0.0


def _shard(model, layout: str = "root"):
    """FSDP2 units by `layout` (root, accelerate or head): `alphatoken.sharding.fully_shard_causal_lm`, as the
    FSDP2 memory benchmark shards its model."""
    from alphatoken.sharding import fully_shard_causal_lm

    return fully_shard_causal_lm(model, layout)


def _full_params(model) -> list:
    from alphatoken.sharding import full

    return [full(p.detach()) for p in model.parameters()]


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)  # momentum: the optimizer has state to resume


def run_head_unit(rank: int, world: int) -> dict:
    """The head as its own FSDP2 unit (resharded after forward): value() unshards it and equals one process's
    values on the whole batch (drift live); the masked loss refuses the layout with a clear error."""
    import alphatoken as at
    from alphatoken.sharding import store_like
    from models import SPEC_RULE, move_weights, random_batch, tiny_model

    base = tiny_model("llama", seed=2)
    fisher = at.estimate_fisher(copy.deepcopy(base), [random_batch(11, B=4)], kind="diag", labels="data",
                                progress=False)
    cfg = at.AlphaTokenConfig(**SPEC_RULE, global_selection=True)
    single, sharded = copy.deepcopy(base), _shard(copy.deepcopy(base), "head")
    v1 = at.AlphaToken(single, cfg.replace(global_selection=False), fisher=fisher)
    vs = at.AlphaToken(sharded, cfg, fisher=fisher)
    move_weights(single, seed=5)
    with torch.no_grad():
        for p, q in zip(sharded.parameters(), single.parameters()):  # the same move, shard by shard
            p.to_local().copy_(store_like(p, q).to_local())
    per = 4 // world
    rows = slice(rank * per, (rank + 1) * per)
    batch = _ragged_batch(300, per)
    mine = _block(batch, rows)
    want, got = v1.value(batch), vs.value(mine)
    block = (rows, slice(0, mine["labels"].shape[1]))
    res = {"mask_equal": bool(torch.equal(got.mask, want.mask[block])),
           "total_rel": _rel(got.total, want.total[block]), "stability_rel": _rel(got.stability, want.stability[block]),
           "drift_live": all(vs.anchor.moved(layer) for layer in vs.layers)}
    try:
        vs.value_and_loss(mine)
        res["refused"] = ""
    except ValueError as err:
        res["refused"] = str(err)
    vs.close()
    v1.close()
    return res


def run_mixed_precision(rank: int, world: int) -> dict:
    """FSDP2 mixed precision (float32 parameters, bfloat16 compute): inside a unit's window the module holds the
    bfloat16 cast, but Δ is the parameters' own drift. Every Δ the valuer forms while valuing is None before any
    move (the cast is no move), and equals one process's float32 Δ exactly after one."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import alphatoken as at
    from alphatoken.sharding import fully_shard_causal_lm, store_like
    from models import SPEC_RULE, move_weights, random_batch, tiny_model

    base = tiny_model("llama", seed=3, dtype=torch.float32)
    move_weights(base, seed=9)
    fisher = at.estimate_fisher(copy.deepcopy(base), [random_batch(11, B=4)], kind="diag", labels="data",
                                progress=False)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    sharded = fully_shard_causal_lm(copy.deepcopy(base), "root", mp_policy=policy)
    vs = at.AlphaToken(sharded, at.AlphaTokenConfig(**SPEC_RULE, global_selection=True), fisher=fisher)
    seen = []
    delta = vs.anchor.delta
    vs.anchor.delta = lambda layer: seen.append((layer.name, delta(layer))) or seen[-1][1]
    mine = _block(_ragged_batch(400, 4 // world), slice(rank * (4 // world), (rank + 1) * (4 // world)))
    vs.value(mine)
    res = {"unmoved_calls": len(seen), "unmoved_all_none": all(d is None for _, d in seen)}
    single = copy.deepcopy(base)
    move_weights(single, seed=6)
    with torch.no_grad():
        for p, q in zip(sharded.parameters(), single.parameters()):
            p.to_local().copy_(store_like(p, q).to_local())
    v1 = at.AlphaToken(single, at.AlphaTokenConfig(**SPEC_RULE), fisher=fisher, reference=base)
    seen.clear()
    vs.value(mine)
    want = {layer.name: v1.anchor.delta(layer) for layer in v1.layers}
    res["moved_calls"] = len(seen)
    res["moved_delta_diff"] = max(float((d - want[name]).abs().max()) if d is not None else float("inf")
                                  for name, d in seen)
    vs.close()
    v1.close()
    return res


def run_case(tie: bool, kind: str, layout: str, rank: int, world: int, out_dir: str, ckpt_dir: str) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import alphatoken as at
    from alphatoken.sharding import is_sharded, local_nbytes
    from models import SPEC_RULE, random_batch, tiny_model

    base = tiny_model("llama", seed=1, tie=tie)
    calibration = [random_batch(11, B=4), random_batch(12, B=4)]
    calibration[1]["labels"][2:] = -100  # the last rank's block of this batch has no response token
    fisher = at.estimate_fisher(copy.deepcopy(base), calibration, kind=kind, labels="data", progress=False)
    if kind == "kfac":  # what target="auto" resolves to on FSDP2-sharded weights: the validation target, cosine,
        # rank fusion over every rank's tokens (named here so that the single process values the same)
        cfg = at.AlphaTokenConfig(keep_ratio=0.5, global_selection=True, target="validation")
        validation = random_batch(21, B=2)
    else:  # the formulas' rule (batch target, U all-reduced over the ranks), normalized by the global RMS
        cfg = at.AlphaTokenConfig(**{**SPEC_RULE, "keep_ratio": 0.5}, global_selection=True, normalize=True)
        validation = None
    single, sharded = copy.deepcopy(base), _shard(copy.deepcopy(base), layout)
    per = 4 // world
    rows = slice(rank * per, (rank + 1) * per)
    # estimated on the sharded model, each rank from its blocks: the single process's Fisher of the whole batches
    estimated = at.estimate_fisher(sharded, [_block(b, rows) for b in calibration], kind=kind, labels="data",
                                   progress=False)
    res = {"steps": [], "T": [],
           "fisher_estimate_rel": max(_rel(_flat(estimated[n]), _flat(fisher[n])) for n in fisher.names())}
    v1 = at.AlphaToken(single, cfg.replace(global_selection=False), fisher=fisher, validation=validation)
    vs = at.AlphaToken(sharded, cfg, fisher=fisher, validation=validation)
    opt1, opts = _sgd(single), _sgd(sharded)

    def step(valuer, opt, batch, n_global, scale):
        result = valuer.step(batch, num_items_in_batch=n_global)
        (result.loss * scale).backward()
        opt.step()
        opt.zero_grad()
        return result.values

    for i in range(3):
        full_batch = _ragged_batch(100 + 10 * i, per)
        mine = _block(full_batch, rows)
        res["T"].append(mine["labels"].shape[1])
        n_global = int((full_batch["labels"] != -100).sum())  # labels[:, 0] is never a response token here
        want = step(v1, opt1, full_batch, n_global, 1.0)
        got = step(vs, opts, mine, n_global, float(world))
        block = (rows, slice(0, mine["labels"].shape[1]))
        res["steps"].append({
            "mask_equal": bool(torch.equal(got.mask, want.mask[block])),
            "kept": int(got.mask.sum()),
            **{f"{part}_rel": _rel(getattr(got, part), getattr(want, part)[block])
               for part in ("adaptation", "stability", "total")},
            "stability_nonzero": bool(want.stability.abs().max() > 0),
            "drift_live": all(vs.anchor.moved(layer) for layer in vs.layers),  # collective: every rank, in order
            "weights_diff": max(float((a - b).abs().max()) for a, b in zip(_full_params(sharded), single.parameters())),
            "kept_logits_rel": _kept_logits_rel(vs, v1, rank, world),
        })
    # per-rank memory of AlphaToken's state, against one process's
    res["anchor_bytes"] = vs.anchor.nbytes()
    res["anchor_bytes_single"] = v1.anchor.nbytes()
    diag = [e[1] for e in vs.fisher_entries.values() if e[0] == "diag"]
    res["fisher_bytes"] = sum(local_nbytes(t) for t in diag)
    res["fisher_bytes_single"] = sum(local_nbytes(e[1]) for e in v1.fisher_entries.values() if e[0] == "diag")
    res["anchor_sharded"] = all(is_sharded(t) for t in vs.anchor.weights.values())
    res["fisher_sharded"] = all(is_sharded(t) for t in diag)

    # checkpoint: model, optimizer and θ₀, sharded; then a fresh run resumed from it
    model_sd, optim_sd = get_state_dict(sharded, opts)
    dcp.save({"model": model_sd, "optim": optim_sd, "anchor": vs.anchor.state_dict()}, checkpoint_id=ckpt_dir)
    nxt = _ragged_batch(200, per)
    mine = _block(nxt, rows)
    n_global = int((nxt["labels"] != -100).sum())
    before = step(vs, opts, mine, n_global, float(world))
    weights_before = _full_params(sharded)
    vs.close()

    resumed = _shard(tiny_model("llama", seed=7, tie=tie), layout)  # other weights: all from the checkpoint
    opt_r = _sgd(resumed)
    vr = at.AlphaToken(resumed, cfg, fisher=fisher, validation=validation)  # θ₀ snapshot of the wrong weights, replaced below
    model_sd, optim_sd = get_state_dict(resumed, opt_r)
    state = {"model": model_sd, "optim": optim_sd, "anchor": vr.anchor.state_dict()}
    dcp.load(state, checkpoint_id=ckpt_dir)  # in place, shard by shard (θ₀ included)
    set_state_dict(resumed, opt_r, model_state_dict=state["model"], optim_state_dict=state["optim"])
    after = step(vr, opt_r, mine, n_global, float(world))
    res["resume_mask_equal"] = bool(torch.equal(before.mask, after.mask))
    res["resume_total_rel"] = _rel(after.total, before.total)
    res["resume_stability_rel"] = _rel(after.stability, before.stability)
    res["resume_weights_diff"] = max(float((a - b).abs().max()) for a, b in zip(_full_params(resumed), weights_before))
    vr.close()
    v1.close()
    dist.barrier()
    return res


def main(out_dir: str, layout: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    code = 0
    try:
        for tie, kind in ((False, "kfac"), (False, "diag"), (True, "diag")):
            name = f"{'tied' if tie else 'untied'}_{kind}"
            res = run_case(tie, kind, layout, rank, world, out_dir, os.path.join(out_dir, f"ckpt_{name}"))
            res["world"] = world
            torch.save(res, os.path.join(out_dir, f"fsdp_{name}_rank{rank}.pt"))
        if layout == "root":
            torch.save(run_head_unit(rank, world), os.path.join(out_dir, f"fsdp_head_unit_rank{rank}.pt"))
            torch.save(run_mixed_precision(rank, world), os.path.join(out_dir, f"fsdp_mixed_rank{rank}.pt"))
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        # Tear the gloo group down before leaving, and skip the interpreter's teardown: a gloo worker thread can
        # abort the process there ("terminate called without an active exception") after the results are written.
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
