"""FSDP2 (`fully_shard`) with 2 CPU processes (gloo), DESIGN §16: values, masks and training steps equal one
process's on the whole batch (float64, drift live, kfac and diag, untied and tied head); θ₀ and the diag Fisher
are stored sharded (per-rank bytes sum to one process's); a checkpoint of model, optimizer and θ₀ resumes the run
exactly. The single-process pieces of `alphatoken.sharding` are checked here directly."""
import pytest
import torch

import alphatoken as at
from alphatoken.sharding import full, hold_unsharded, is_sharded, local_nbytes, store_like
from integration_helpers import launch_two_ranks


def test_sharding_helpers_are_the_identity_on_plain_tensors():
    w = torch.randn(5, 3, dtype=torch.float64)
    copy = store_like(w, w * 2, dtype=torch.float32)
    assert not is_sharded(copy) and copy.dtype == torch.float32
    assert torch.equal(copy, (w * 2).float()) and copy.data_ptr() != w.data_ptr()
    assert full(copy) is copy
    assert local_nbytes(copy) == 5 * 3 * 4
    with pytest.raises(ValueError, match=r"shape \(3, 5\) for a weight of shape \(5, 3\)"):
        store_like(w, w.T)
    module = torch.nn.Linear(3, 5)
    with hold_unsharded(module, module):  # no FSDP: nothing to unshard
        assert module.weight is not None


def test_anchor_state_dict_round_trip_and_reference():
    from models import random_batch, tiny_model

    model = tiny_model("llama")
    fisher = at.estimate_fisher(model, [random_batch(1)], kind="kfac", progress=False)
    valuer = at.AlphaToken(model, at.AlphaTokenConfig(target="none"), fisher=fisher)
    anchor = valuer.anchor
    state = {k: v.clone() for k, v in anchor.state_dict().items()}
    assert set(state) == {f"{layer.name}.weight" for layer in valuer.layers}
    head = valuer.layers[0]
    assert torch.equal(anchor.reference(head), model.lm_head.weight)
    with torch.no_grad():
        for t in anchor.state_dict().values():
            t.add_(1.0)  # state_dict() hands out the stored tensors themselves (what a checkpoint loads into)
    assert anchor.moved(head)
    anchor.load_state_dict(state)
    assert not anchor.moved(head)
    with pytest.raises(ValueError, match="has no"):
        anchor.load_state_dict({})
    valuer.close()


def test_deepspeed_zero3_weights_are_refused():
    from models import tiny_model

    model = tiny_model("llama")
    model.lm_head.weight.ds_id = 0  # what DeepSpeed ZeRO-3 puts on a partitioned parameter
    with pytest.raises(ValueError, match="ZeRO-3"):
        at.AlphaToken(model, at.AlphaTokenConfig(target="none"), fisher=None)


@pytest.mark.parametrize("layout", ["root", "accelerate"])
def test_fsdp2_values_masks_steps_and_checkpoint_equal_single_process(tmp_path, layout):
    """layout "root": the head sharded with the root unit; "accelerate": accelerate's FSDP2 layout (embedding and
    the tail [final norm, head] their own units)."""
    launch_two_ranks("fsdp_worker.py", tmp_path, layout, launcher="torchrun")
    for r in range(2 if layout == "root" else 0):  # the head as its own unit: value() equals one process's; the masked loss refuses it
        res = torch.load(tmp_path / f"fsdp_head_unit_rank{r}.pt")
        assert res["mask_equal"] and res["total_rel"] < 1e-6 and res["stability_rel"] < 1e-6, res
        assert res["drift_live"], res
        assert "alone in its own FSDP2 unit" in res["refused"], res
    for r in range(2 if layout == "root" else 0):  # mixed precision: the float32 cast is no drift; Δ is the master's
        res = torch.load(tmp_path / f"fsdp_mixed_rank{r}.pt")
        assert res["unmoved_calls"] > 0 and res["unmoved_all_none"], res
        assert res["moved_calls"] == res["unmoved_calls"] and res["moved_delta_diff"] == 0.0, res
    for case in ("untied_kfac", "untied_diag", "tied_diag"):
        results = [torch.load(tmp_path / f"fsdp_{case}_rank{r}.pt") for r in range(2)]
        assert all(a != b for a, b in zip(results[0]["T"], results[1]["T"])), case  # the ranks' T differ
        assert sum(s["kept"] for r in results for s in r["steps"]) > 0
        for res in results:
            assert res["world"] == 2
            assert res["fisher_estimate_rel"] < 1e-12, (case, res)  # estimate_fisher on the sharded model
            for i, step in enumerate(res["steps"]):
                where = (case, i, step)
                assert step["mask_equal"], where
                for part in ("adaptation", "stability", "total"):
                    assert step[f"{part}_rel"] < 1e-6, where  # float64 sums, float32 TokenValues
                assert step["stability_nonzero"] and step["drift_live"], where
                assert step["weights_diff"] < 1e-12, where  # the masked step trains the sharded weights alike
                assert step["kept_logits_rel"] < 1e-6, where  # the kept rows' logits, recomputed after the step
            assert res["resume_mask_equal"] and res["resume_total_rel"] < 1e-12, (case, res)
            assert res["resume_stability_rel"] < 1e-12 and res["resume_weights_diff"] < 1e-12, (case, res)
            assert res["anchor_sharded"]
        # 1/world: the ranks' shards add up to one process's θ₀ (and diag Fisher), each rank holding at most half
        single = results[0]["anchor_bytes_single"]
        assert sum(r["anchor_bytes"] for r in results) == single
        assert max(r["anchor_bytes"] for r in results) <= single // 2 + 1024
        if case.endswith("diag"):
            assert all(r["fisher_sharded"] for r in results)
            assert sum(r["fisher_bytes"] for r in results) == results[0]["fisher_bytes_single"] > 0
            assert max(r["fisher_bytes"] for r in results) <= results[0]["fisher_bytes_single"] // 2 + 1024


def test_trainer_with_accelerate_fsdp2_plugin_equals_ddp(tmp_path):
    """AlphaTokenTrainer (online mode) with accelerate's FSDP2 plugin under `accelerate launch`, 2 CPU processes:
    the weights after two accumulated steps, the logged loss, keep ratio and stability equal the same run under
    DDP (itself held to one process by test_ddp.py); weights, θ₀ and the diag Fisher were sharded."""
    for res in launch_two_ranks("fsdp_trainer.py", tmp_path, results="trainer_rank{}.pt"):
        assert res["world"] == 2, res
        assert res["weights_sharded"] and res["anchor_sharded"] and res["fisher_sharded"], res
        assert res["moved"] > 1e-3 and res["drift_live"], res  # it trained, and the second step's drift was live
        assert res["weights_diff"] < 1e-10, res
        for key in ("loss", "keep_ratio", "stability"):
            ddp, fsdp = res[key]
            assert len(ddp) == 2 and fsdp == pytest.approx(ddp, rel=1e-9, abs=1e-12), (key, res)
