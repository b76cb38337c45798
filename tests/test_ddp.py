"""accelerate/DDP on CPU with 2 gloo processes: global selection equals the single-process mask on the global
batch, and AlphaTokenTrainer keeps the ranks in sync."""
import os
import socket

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
        for name in ("batch_validation", "sequence_validation", "batch_batch", "batch_batch_normalized"):
            assert res[f"{name}_equal"] and res[f"{name}_values_close"], (name, res)
        assert res["batch_validation_differs_from_local"], res  # the batch selection really is global
        assert res["batch_batch_differs_from_local"], res  # and so is the batch target direction
        assert res["weights_in_sync"], res
        assert res["custom_loop_in_sync"], res  # gradients were synchronized through the wrapper's forward
        assert res["custom_loop_losses"][-1] < res["custom_loop_losses"][0], res
        assert len(res["logged_keep_ratio"]) == 2
