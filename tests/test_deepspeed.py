"""DeepSpeed ZeRO-2 with alphatoken_mode="ahead" (DESIGN §17), 2 CPU processes under `accelerate launch`: the
trainer's losses, keep ratios and final weights equal the same run under DDP. ZeRO-3 is refused where the valuer
is built (tests/test_fsdp.py::test_deepspeed_zero3_weights_are_refused)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from test_fsdp import _env, _free_port

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (pip install -e '.[deepspeed]'); on GPUs run "
           "`accelerate launch --use_deepspeed --zero_stage 2 --num_processes 2 tests/deepspeed_trainer.py OUT`")


@needs_deepspeed
def test_zero2_ahead_mode_equals_ddp(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "deepspeed_trainer.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), script, str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in range(2):
        res = torch.load(tmp_path / f"ds_rank{r}.pt")
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
