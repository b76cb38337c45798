"""keep_ratio=1.0 against TRL's SFTTrainer: identical to float32 rounding in float32; in bf16 both are the same
distance from a float64 reference (bf16 rounding at different places), which is why they differ by about a bf16 ulp.

Measured with these helpers on a wider tiny Llama (hidden 64, 80,192 params, batch 4, AdamW lr 1e-3):
float32: step-1 gradients 2e-7 apart (each 4e-7 from float64), 0 params differ by > 1e-4 after 3 steps;
bf16: each 5e-3 from float64, 5e-3 apart; AdamW's first step is lr·sign(g), so the coordinates whose gradient is
below the rounding noise move by ±lr either way: ~500 params differ by > 1e-4 after 3 steps.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import alphatoken as at
from integration_helpers import tiny_llama, tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
SFT = [("ab", "cd e"), ("x", "yz1"), ("hello", " w"), ("12", "345 6"), ("abc", "d e f g"), ("9", "87 6")]


def _run(tmp_path, cls, base, bf16: bool, steps: int, **kw):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig

    grads, batches = [], []

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **k):
            grads.append(torch.cat([p.grad.detach().double().reshape(-1) for p in model.parameters()]))

    class Recording(cls):
        def compute_loss(self, model, inputs, *a, **k):
            if model.training:
                batches.append({key: inputs[key].detach().clone() for key in ("input_ids", "attention_mask", "labels")})
            return super().compute_loss(model, inputs, *a, **k)

    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=steps, learning_rate=1e-3,
                     logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, max_grad_norm=0.0,
                     lr_scheduler_type="constant", bf16=bf16)
    ds = Dataset.from_list([{"prompt": p, "completion": c} for p, c in SFT])
    trainer = Recording(model=copy.deepcopy(base), args=args, train_dataset=ds, processing_class=tokenizer(),
                        callbacks=[Grads()], **kw)
    trainer.train()
    params = torch.cat([p.detach().double().reshape(-1) for p in trainer.model.parameters()])
    return params, grads, batches


def _float64_gradient(base, batch) -> torch.Tensor:
    model = copy.deepcopy(base).double()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                    ignore_index=-100).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_keep_all_matches_trl_exactly_in_float32_and_to_rounding_in_bf16(tmp_path):
    from trl import SFTTrainer

    from alphatoken.integrations import AlphaTokenSFTTrainer

    base = tiny_llama()
    cfg = at.AlphaTokenConfig(keep_ratio=1.0)
    # float32: three AdamW steps land on the same weights (float32 rounding only)
    p_trl, g_trl, b_trl = _run(tmp_path, SFTTrainer, base, False, 3)
    p_at, g_at, b_at = _run(tmp_path, AlphaTokenSFTTrainer, base, False, 3, alphatoken=cfg)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(b_trl, b_at))
    g64 = _float64_gradient(base, b_trl[0])
    scale = g64.norm()
    assert float((g_at[0] - g_trl[0]).norm() / scale) < 1e-6
    assert float((g_at[0] - g64).norm() / scale) < 1e-6
    torch.testing.assert_close(p_at, p_trl, rtol=0, atol=1e-5)

    # bf16: both are within a few bf16 ulps (2^-8 relative) of the float64 gradient, equally far, and their mutual
    # difference is of the size of TRL's own rounding error: rounding order, not a different loss
    _, g_trl16, b16 = _run(tmp_path, SFTTrainer, base, True, 1)
    _, g_at16, _ = _run(tmp_path, AlphaTokenSFTTrainer, base, True, 1, alphatoken=cfg)
    assert torch.equal(b16[0]["input_ids"], b_trl[0]["input_ids"])
    err_trl = float((g_trl16[0] - g64).norm() / scale)
    err_at = float((g_at16[0] - g64).norm() / scale)
    apart = float((g_at16[0] - g_trl16[0]).norm() / scale)
    assert 1e-5 < err_trl < 2 ** -6 and 1e-5 < err_at < 2 ** -6  # bf16 rounding is there, and small
    assert err_at < 2 * err_trl and apart < 2 * err_trl
