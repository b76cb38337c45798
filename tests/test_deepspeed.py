"""DeepSpeed ZeRO-2 with alphatoken_mode="ahead" (DESIGN §17), 2 CPU processes under `accelerate launch`: the
trainer's losses, keep ratios and final weights equal the same run under DDP. ZeRO-3 is refused where the valuer
is built (tests/test_fsdp.py::test_deepspeed_zero3_weights_are_refused)."""
import importlib.util

import pytest

from integration_helpers import launch_two_ranks

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (pip install -e '.[deepspeed]'); on GPUs run "
           "`accelerate launch --use_deepspeed --zero_stage 2 --num_processes 2 tests/deepspeed_trainer.py OUT`")


@needs_deepspeed
def test_zero2_ahead_mode_equals_ddp(tmp_path):
    for res in launch_two_ranks("deepspeed_trainer.py", tmp_path, results="ds_rank{}.pt"):
        assert res["world"] == 2 and res["deepspeed"] and res["stage"] == 2, res
        assert res["weights_diff"] < 1e-6, res  # float32 AdamW, DeepSpeed's partitioned step vs DDP's
        ddp, ds = res["loss"]
        assert len(ddp) == 2 and ds == pytest.approx(ddp, rel=1e-6), res
        ddp, ds = res["keep_ratio"]
        assert ds == ddp and all(0 < k < 1 for k in ds), res


def test_trainer_refuses_zero3_when_built():
    """The trainer says so at construction, before a step (the valuer refuses ZeRO-3 weights too)."""
    from types import SimpleNamespace

    from alphatoken.integrations.trainer import AlphaTokenMixin

    for mode in ("online", "ahead"):
        stub = SimpleNamespace(args=SimpleNamespace(), _at_mode=mode, is_deepspeed_enabled=True,
                               accelerator=SimpleNamespace(state=SimpleNamespace(
                                   deepspeed_plugin=SimpleNamespace(zero_stage=3))))
        with pytest.raises(ValueError, match="ZeRO-3"):
            AlphaTokenMixin._at_check_setup(stub)
    stub.accelerator.state.deepspeed_plugin.zero_stage = 2  # ZeRO-2 with "ahead" passes the check
    AlphaTokenMixin._at_check_setup(stub)
