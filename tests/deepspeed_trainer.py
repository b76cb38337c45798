"""Run by tests/test_deepspeed.py under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo):
AlphaTokenTrainer with alphatoken_mode="ahead" under DeepSpeed ZeRO-2, against the same run under DDP.
Writes <out>/ds_rank<r>.pt: the final weights' largest difference, the logged losses and keep ratios of both runs,
and the ZeRO stage the trainer ran with."""
import json
import os
import sys
import warnings

import torch

ZERO2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
         "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto",
         "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
         "zero_allow_untested_optimizer": True, "bf16": {"enabled": False}, "fp16": {"enabled": False}}


def _train(out_dir: str, deepspeed: bool):
    from datasets import Dataset
    from transformers import TrainingArguments

    import alphatoken as at
    from alphatoken.integrations import AlphaTokenTrainer
    from integration_helpers import collate, sft_examples, tiny_llama

    extra = {}
    if deepspeed:
        path = os.path.join(out_dir, "zero2.json")
        with open(path, "w") as f:
            json.dump(ZERO2, f)
        extra["deepspeed"] = path
    args = TrainingArguments(output_dir=os.path.join(out_dir, "ds" if deepspeed else "ddp"),
                             per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
                             learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", remove_unused_columns=False, ddp_backend="gloo", seed=0, **extra)
    trainer = AlphaTokenTrainer(model=tiny_llama(), args=args, train_dataset=Dataset.from_list(sft_examples(16)),
                                data_collator=collate, alphatoken_mode="ahead",
                                alphatoken=at.AlphaTokenConfig(keep_ratio=0.5, target="batch", global_selection=True))
    trainer.train()
    return trainer


def _compare(out_dir: str) -> None:
    import torch.distributed as dist

    from integration_helpers import ddp_comparison, save_rank_result

    ddp = _train(out_dir, deepspeed=False)
    ddp_weights = [p.detach().clone() for p in ddp.accelerator.unwrap_model(ddp.model).parameters()]
    ds = _train(out_dir, deepspeed=True)
    ds_weights = [p.detach().clone() for p in ds.accelerator.unwrap_model(ds.model).parameters()]
    result = {"world": dist.get_world_size(), "deepspeed": bool(ds.is_deepspeed_enabled),
              "stage": ds.accelerator.state.deepspeed_plugin.zero_stage,
              **ddp_comparison(ddp, ds, ddp_weights, ds_weights)}
    save_rank_result(ds, result, out_dir, "ds")


def main(out_dir: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from integration_helpers import run_rank_and_exit

    run_rank_and_exit(lambda: _compare(out_dir))


if __name__ == "__main__":
    main(sys.argv[1])
