"""Run by tests/test_fsdp.py under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo):
AlphaTokenTrainer with accelerate's FSDP2 plugin, against the same run under DDP (which tests/test_ddp.py holds to
one process). Float64 tiny Llama, diag Fisher (stored sharded), batch target, global selection, two optimizer
steps of two accumulated micro-batches (the second step values with the drift live).

accelerate 1.16 drops the FSDP plugin when the distributed type is MULTI_CPU (its FSDP branch lists GPU-like
devices only), so on a CPU-only machine `--use_fsdp` silently trains with DDP. `_fsdp_on_cpu` sets the plugin and
the distributed type on the shared AcceleratorState after the Trainer is built and before `train()` prepares the
model; on GPUs `accelerate launch --use_fsdp --fsdp_version 2` needs none of this.

Written to <out>/trainer_rank<r>.pt: the final weights' largest difference DDP vs FSDP2, the logged losses and
keep ratios of both, and whether the model's weights, θ₀ and the Fisher were sharded.
"""
import os
import sys
import warnings

import torch


def _fsdp_on_cpu(trainer) -> None:
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"], reshard_after_forward=True)
        state.distributed_type = DistributedType.FSDP
        trainer.is_fsdp_enabled = True


def _train(fsdp: bool, out_dir: str, fisher):
    from datasets import Dataset
    from transformers import TrainingArguments

    import alphatoken as at
    from alphatoken.integrations import AlphaTokenTrainer
    from integration_helpers import collate, sft_examples, tiny_llama

    args = TrainingArguments(output_dir=os.path.join(out_dir, "fsdp" if fsdp else "ddp"),
                             per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
                             learning_rate=5e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, ddp_backend="gloo", seed=0)
    cfg = at.AlphaTokenConfig(keep_ratio=0.5, target="batch", global_selection=True)
    trainer = AlphaTokenTrainer(model=tiny_llama().double(), args=args,
                                train_dataset=Dataset.from_list(sft_examples(16)), data_collator=collate,
                                alphatoken=cfg, fisher=fisher)
    if fsdp:
        _fsdp_on_cpu(trainer)
    trainer.train()
    return trainer


def _compare(out_dir: str) -> None:
    import torch.distributed as dist

    import alphatoken as at
    from alphatoken.sharding import full, is_sharded
    from integration_helpers import ddp_comparison, pad_batch, save_rank_result, sft_examples, tiny_llama

    fisher = at.estimate_fisher(tiny_llama().double(), [pad_batch(sft_examples(4, seed=11))], kind="diag",
                                labels="data", progress=False)
    ddp = _train(False, out_dir, fisher)
    ddp_weights = [p.detach().clone() for p in ddp.accelerator.unwrap_model(ddp.model).parameters()]
    sharded = _train(True, out_dir, fisher)
    model = sharded.model
    valuer = sharded.alphatoken_valuer
    fsdp_weights = [full(p.detach()) for p in model.parameters()]
    result = {
        "world": dist.get_world_size(),
        "weights_sharded": all(is_sharded(p) for p in model.parameters()),
        "anchor_sharded": all(is_sharded(t) for t in valuer.anchor.weights.values()),
        "fisher_sharded": all(is_sharded(e[1]) for e in valuer.fisher_entries.values()),
        "moved": max(float((a - b).abs().max()) for a, b in zip(fsdp_weights, tiny_llama().double().parameters())),
        "drift_live": all(valuer.anchor.moved(layer) for layer in valuer.layers),
        **ddp_comparison(ddp, sharded, ddp_weights, fsdp_weights, keys=("loss", "keep_ratio", "stability")),
    }
    save_rank_result(sharded, result, out_dir, "trainer")


def main(out_dir: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from integration_helpers import run_rank_and_exit

    run_rank_and_exit(lambda: _compare(out_dir))


if __name__ == "__main__":
    main(sys.argv[1])
