"""alphatoken_mode="ahead" with Liger's kernels (`apply_liger_kernel_to_llama`): the training forward is Liger's fused
linear cross-entropy (no logits) on the masked labels, and the step is still the exact mean over the kept tokens of
the accumulation window.

On CPU, Liger's fused linear cross-entropy runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest), but
its RMSNorm, RoPE and SwiGLU kernels do not, so the CPU test patches the fused cross-entropy alone; the `gpu` test
patches every Liger kernel on CUDA. Needs `pip install -e ".[liger]"` (Linux; part of the `test` extra).
"""
import copy

import pytest
import torch

import alphatoken as at
from alphatoken.integrations import AlphaTokenTrainer
from integration_helpers import collate, sft_examples, tiny_llama
from test_integration_trainer import _args, _hand_grads, _original_labels, _recording, _Recorder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
liger = pytest.importorskip("liger_kernel.transformers",
                            reason="liger-kernel is not installed (pip install -e '.[liger]')")


def _check_ahead_with_liger(tmp_path, model, device: str, rtol: float, atol: float):
    from datasets import Dataset

    model0 = copy.deepcopy(model)  # an unpatched copy for the hand computation
    liger.apply_liger_kernel_to_llama(model=model, **({} if device == "cuda" else
                                                     dict(rope=False, rms_norm=False, swiglu=False,
                                                          fused_linear_cross_entropy=True)))
    assert model.forward.__func__.__module__.startswith("liger_kernel")  # Liger's forward: fused linear CE
    head_calls = []
    model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))  # Liger's fused CE never calls the head
    cfg = at.AlphaTokenConfig(keep_ratio=0.5)
    rec = _Recorder()
    trainer = _recording(AlphaTokenTrainer, rec)(
        model=model, args=_args(tmp_path, use_cpu=device == "cpu"), train_dataset=Dataset.from_list(sft_examples(8)),
        data_collator=collate, alphatoken=cfg, alphatoken_mode="ahead", callbacks=[rec.callback()])
    trainer.train()
    assert len(head_calls) == len(rec.batches) == 2  # the valuation forwards only: training ran the fused loss
    batches = [{k: v.cpu() for k, v in b.items() if k in ("input_ids", "attention_mask", "labels")}
               for b in rec.batches]
    assert any(bool((b["labels"][:, 1:] != -100).sum() < (b["attention_mask"][:, 1:].sum())) for b in batches)
    batches = [dict(b, labels=orig) for b, orig in zip(batches, _original_labels(batches, trainer))]
    want, want_loss, masked = _hand_grads(model0.cpu(), cfg, batches)
    for b, m in zip(rec.batches, masked):  # the training forward saw exactly the masked labels
        assert torch.equal(b["labels"].cpu(), m)
    for name in want:
        torch.testing.assert_close(rec.grads[name].cpu(), want[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert trainer.state.log_history[0]["loss"] == pytest.approx(want_loss, rel=max(rtol, 1e-4))


def test_ahead_mode_with_liger_fused_linear_cross_entropy_cpu(tmp_path):
    _check_ahead_with_liger(tmp_path, tiny_llama(), "cpu", rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (Liger's RMSNorm/RoPE/SwiGLU kernels)")
def test_ahead_mode_with_every_liger_kernel_gpu(tmp_path):
    _check_ahead_with_liger(tmp_path, tiny_llama().cuda(), "cuda", rtol=1e-3, atol=1e-5)
