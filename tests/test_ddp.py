"""accelerate/DDP on CPU with 2 gloo processes: global selection equals the single-process mask on the global
batch, and AlphaTokenTrainer keeps the ranks in sync."""
import os
import socket
import subprocess
import sys

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_global_selection_and_trainer(tmp_path):
    import ddp_worker

    mp.spawn(ddp_worker.run, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    assert results[0]["T"] != results[1]["T"]
    for res in results:
        for name in ("batch_validation", "sequence_validation", "batch_batch", "batch_batch_normalized",
                     "batch_validation_rank"):
            assert res[f"{name}_equal"] and res[f"{name}_values_close"], (name, res)
        assert res["batch_validation_differs_from_local"], res  # the batch selection really is global
        assert res["batch_batch_differs_from_local"], res  # and so is the batch target direction
        assert res["weights_in_sync"], res
        assert res["custom_loop_in_sync"], res  # gradients were synchronized through the wrapper's forward
        assert res["custom_loop_losses"][-1] < res["custom_loop_losses"][0], res
        assert len(res["logged_keep_ratio"]) == 2


def test_accelerate_launch_custom_loop(tmp_path):
    """The README's accelerate loop under `accelerate launch` with 2 CPU processes (gloo DDP)."""
    script = os.path.join(os.path.dirname(__file__), "accelerate_loop.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), script, str(tmp_path)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "ALPHATOKEN_PROGRESS": "0"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [torch.load(os.path.join(tmp_path, f"accel_rank{r}.pt")) for r in range(2)]
    assert results[0]["T"] != results[1]["T"]
    for res in results:
        assert res["world"] == 2 and res["wrapped"] == "DistributedDataParallel", res
        assert res["mask_equal"] and res["values_close"], res  # its block of the single-process mask
        assert res["weights_in_sync"], res
        assert res["losses"][-1] < res["losses"][0], res
        assert res["hooks_left"] == 0, res
    assert sum(r["kept"] for r in results) > 0
