"""Run by tests/test_ddp.py under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): the README's
accelerate loop, as a user writes it. Rank r holds half of a global batch, padded to its own length.

Checks written to <out>/accel_rank<r>.pt: the prepared (DDP-wrapped) model is looked through; with
global_selection=True each rank's mask and values are its block of the single-process result on the global
batch (batch target: U all-reduced; kfac Fisher); three steps of the loop lower the loss and keep the ranks'
weights identical; the hooks are gone after close().
"""
import os
import sys
import warnings

import torch


def main(out_dir: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from accelerate import Accelerator

    import alphatoken as at
    from integration_helpers import pad_batch, sft_examples, tiny_llama

    accelerator = Accelerator(cpu=True)  # on a CPU-only machine this is what makes the processes one gloo group
    rank, world = accelerator.process_index, accelerator.num_processes
    examples = sorted(sft_examples(8, seed=5), key=lambda e: len(e["input_ids"]))  # rank 0: the short half
    per = len(examples) // world
    mine, full = pad_batch(examples[rank * per:(rank + 1) * per]), pad_batch(examples)
    fisher = at.estimate_fisher(tiny_llama(), [pad_batch(sft_examples(4, seed=11))], kind="kfac", labels="data",
                                progress=False)
    cfg = at.AlphaTokenConfig(keep_ratio=0.5, global_selection=True, normalize=True)

    with at.AlphaToken(tiny_llama(), cfg.replace(global_selection=False), fisher=fisher) as single:
        want = single.value(full)
    block = (slice(rank * per, (rank + 1) * per), slice(0, mine["labels"].shape[1]))

    model = tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model, opt = accelerator.prepare(model, opt)
    valuer = at.AlphaToken(model, cfg, fisher=fisher)
    got = valuer.value(mine)
    losses = []
    for _ in range(3):
        loss = valuer.value_and_loss(mine)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    valuer.close()
    inner = accelerator.unwrap_model(model)
    hooks_left = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in inner.modules())
    flat = torch.cat([p.detach().flatten() for p in inner.parameters()])
    gathered = accelerator.gather(flat.unsqueeze(0))
    result = {
        "world": world,
        "wrapped": type(model).__name__,
        "T": mine["labels"].shape[1],
        "mask_equal": bool(torch.equal(got.mask, want.mask[block])),
        "values_close": bool(torch.allclose(got.total, want.total[block], rtol=1e-4, atol=1e-6)),
        "kept": int(got.mask.sum()),
        "losses": losses,
        "weights_in_sync": bool(all(torch.equal(gathered[0], row) for row in gathered)),
        "hooks_left": hooks_left,
    }
    torch.save(result, os.path.join(out_dir, f"accel_rank{rank}.pt"))
    accelerator.wait_for_everyone()
    # Tear the gloo group down before the interpreter exits: leaving it to process exit lets gloo's threads be
    # destroyed while still joinable ("terminate called without an active exception", SIGABRT) now and then.
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # everything is saved; skip the interpreter's teardown, where a worker thread can still abort


if __name__ == "__main__":
    main(sys.argv[1])
