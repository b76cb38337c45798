"""Worker of tests/test_ddp.py: 2 CPU processes (gloo). Rank r holds half of a global batch, padded to its own
length. Checks: global_selection=True gives each rank its block of the single-process mask on the global batch;
AlphaTokenTrainer trains under DDP with the ranks' weights staying identical."""
import os
import sys
import warnings

import torch


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    sys.path.insert(0, os.path.dirname(__file__))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import torch.distributed as dist

    import alphatoken as at
    from integration_helpers import collate, pad_batch, sft_examples, tiny_llama

    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = {}
    examples = sft_examples(8, seed=3)
    examples.sort(key=lambda e: len(e["input_ids"]))  # rank 0 gets the short half: different T per rank
    per = len(examples) // world
    mine = pad_batch(examples[rank * per:(rank + 1) * per])
    full = pad_batch(examples)
    validation = pad_batch(sft_examples(4, seed=9))
    model = tiny_llama()
    fisher = at.estimate_fisher(model, [pad_batch(sft_examples(4, seed=11))], kind="kfac")
    cases = [("batch", "validation", False, "linear"), ("sequence", "validation", False, "linear"),
             ("batch", "batch", False, "linear"), ("batch", "batch", True, "linear"),
             ("batch", "validation", False, "rank")]  # the defaults: cosine, rank fusion over every rank's tokens
    for selection, target, normalize, combine in cases:
        name = f"{selection}_{target}{'_normalized' if normalize else ''}{'_rank' if combine == 'rank' else ''}"
        cfg = at.AlphaTokenConfig(keep_ratio=0.4, selection=selection, target=target, global_selection=True,
                                  min_keep_per_sequence=1, normalize=normalize, combine=combine,
                                  cosine=combine == "rank", stability_weight=0.5 if combine == "rank" else 1.0)
        with at.AlphaToken(model, cfg, fisher=fisher, validation=validation) as v:
            got = v.value(mine)
        single = cfg.replace(global_selection=False)
        with at.AlphaToken(model, single, fisher=fisher, validation=validation) as v:
            block = (slice(rank * per, (rank + 1) * per), slice(0, mine["labels"].shape[1]))
            want = v.value(full)
            local = v.value(mine).mask
        result[f"{name}_equal"] = bool(torch.equal(got.mask, want.mask[block]))
        result[f"{name}_values_close"] = bool(torch.allclose(got.total, want.total[block], rtol=1e-4, atol=1e-6))
        result[f"{name}_differs_from_local"] = not bool(torch.equal(local, got.mask))
    result["T"] = mine["labels"].shape[1]

    # a custom loop: the DDP-wrapped model handed straight to AlphaToken (README's accelerate loop)
    ddp = torch.nn.parallel.DistributedDataParallel(tiny_llama())
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    with at.AlphaToken(ddp, at.AlphaTokenConfig(keep_ratio=0.5, global_selection=True), fisher=None) as valuer:
        losses = []
        for _ in range(3):
            loss = valuer.value_and_loss(mine)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    flat = torch.cat([p.detach().flatten() for p in ddp.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    result["custom_loop_in_sync"] = all(torch.equal(gathered[0], g) for g in gathered)
    result["custom_loop_losses"] = losses

    # AlphaTokenTrainer under DDP (accelerate picks up the process group from the environment)
    from datasets import Dataset
    from transformers import TrainingArguments

    from alphatoken.integrations import AlphaTokenTrainer

    args = TrainingArguments(output_dir=os.path.join(out_dir, "trainer"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, logging_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no", remove_unused_columns=False,
                             ddp_backend="gloo", seed=0)
    trainer = AlphaTokenTrainer(model=tiny_llama(), args=args, train_dataset=Dataset.from_list(sft_examples(16)),
                                data_collator=collate, alphatoken=at.AlphaTokenConfig(keep_ratio=0.5, paths="direct",
                                                                                      global_selection=True))
    trainer.train()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    result["weights_in_sync"] = all(torch.equal(gathered[0], g) for g in gathered)
    result["logged_keep_ratio"] = [h.get("alphatoken/keep_ratio") for h in trainer.state.log_history if "loss" in h]
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    # Everything is saved: leave without the interpreter's teardown, where a C++ worker thread of the process
    # group or the Trainer could still abort the process ("terminate called without an active exception", seen
    # once on a loaded machine) after the results were written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
