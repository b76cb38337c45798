"""accelerate/DDP on CPU with 2 gloo processes: global selection equals the single-process mask on the global
batch, and AlphaTokenTrainer keeps the ranks in sync."""
import os

import torch
import torch.multiprocessing as mp

from integration_helpers import free_port, launch_two_ranks


def test_ddp_global_selection_and_trainer(tmp_path):
    import ddp_worker

    mp.spawn(ddp_worker.run, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
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
    results = launch_two_ranks("accelerate_loop.py", tmp_path, results="accel_rank{}.pt")
    assert results[0]["T"] != results[1]["T"]
    for res in results:
        assert res["world"] == 2 and res["wrapped"] == "DistributedDataParallel", res
        assert res["mask_equal"] and res["values_close"], res  # its block of the single-process mask
        assert res["weights_in_sync"], res
        assert res["losses"][-1] < res["losses"][0], res
        assert res["hooks_left"] == 0, res
    assert sum(r["kept"] for r in results) > 0
