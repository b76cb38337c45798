"""torch.distributed helpers: selection over the values of all ranks (`global_selection=True`).

Every rank holds its own micro-batch `(B_r, T_r)`; the shapes may differ across ranks. `gather_values` pads each
rank's `total` and `response` to the largest `(B, T)`, all-gathers them, and stacks the real rows of every rank in
rank order, so that the global tensors are exactly what one process would hold for the concatenated batch padded on
the right to the longest sequence. Selection on the global tensors then gives the single-process mask on the same
global batch (ties break by position, and right-padding does not change the row-major order of real positions).

Works with any backend whose all_gather takes the tensors' device (gloo: CPU, nccl: CUDA). Everything here is a no-op
for a single process or when torch.distributed is not initialized.
"""
from __future__ import annotations

from typing import Callable, Tuple

import torch


def is_distributed() -> bool:
    """True under an initialized torch.distributed with more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(tensor: torch.Tensor) -> torch.device:
    import torch.distributed as dist

    backend = dist.get_backend()
    if backend == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo" and tensor.device.type != "cpu":
        return torch.device("cpu")
    return tensor.device


def all_reduce_sum(value, group=None):
    """Sum a tensor (or Python number) over ranks; returns a new tensor on the input's device (a number as float)."""
    import torch.distributed as dist

    is_number = not isinstance(value, torch.Tensor)
    tensor = torch.as_tensor(value, dtype=torch.float64 if is_number else None)
    if not is_distributed():
        return float(tensor) if is_number else tensor.clone()
    device = _comm_device(tensor)
    buf = tensor.detach().to(device).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return float(buf) if is_number else buf.to(tensor.device)


def gather_values(
    total: torch.Tensor, response: torch.Tensor, group=None
) -> Tuple[torch.Tensor, torch.Tensor, Tuple[slice, slice]]:
    """All ranks' values as one global batch.

    Args:
        total: (B_r, T_r) float values of this rank's micro-batch.
        response: (B_r, T_r) bool, the response tokens that were valued.
    Returns:
        `(global_total, global_response, my_slice)`: `global_total` (ΣB_r, max T_r) float32 and `global_response`
        (ΣB_r, max T_r) bool, rows in rank order, right-padded with 0 / False; `my_slice` = `(rows, cols)` slices
        such that `global_x[my_slice]` is this rank's `(B_r, T_r)` block.
    Single process (or torch.distributed not initialized): the inputs themselves and full slices.
    """
    if total.shape != response.shape or total.dim() != 2:
        raise ValueError(f"total {tuple(total.shape)} and response {tuple(response.shape)} must be the same (B, T)")
    B, T = total.shape
    if not is_distributed():
        return total.float(), response.bool(), (slice(0, B), slice(0, T))
    import torch.distributed as dist

    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    device = _comm_device(total)
    shape = torch.tensor([B, T], dtype=torch.long, device=device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    shapes = [tuple(int(v) for v in s.tolist()) for s in shapes]
    b_max = max(s[0] for s in shapes)
    t_max = max(s[1] for s in shapes)

    # one all_gather for both: the value and the response flag side by side (float32 carries the bool exactly)
    packed = torch.zeros(b_max, t_max, 2, dtype=torch.float32, device=device)
    packed[:B, :T, 0] = total.detach().to(device=device, dtype=torch.float32)
    packed[:B, :T, 1] = response.to(device=device, dtype=torch.float32)
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    rows = torch.cat([g[: s[0]] for g, s in zip(gathered, shapes)], dim=0).to(total.device)
    global_total = rows[..., 0].contiguous()
    global_response = rows[..., 1] > 0.5
    row0 = sum(s[0] for s in shapes[:rank])
    return global_total, global_response, (slice(row0, row0 + B), slice(0, T))


def select_global(
    total: torch.Tensor,
    response: torch.Tensor,
    cfg,
    select_local: Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor],
    group=None,
) -> torch.Tensor:
    """This rank's keep-mask from a selection over the values of all ranks.

    Every rank runs `select_local` on the same gathered global batch (a deterministic function of it), so the ranks
    agree without a broadcast, and each returns its own block of the global mask.
    """
    global_total, global_response, my_slice = gather_values(total, response, group=group)
    global_mask = select_local(global_total, global_response, cfg)
    return global_mask[my_slice].to(response.device).contiguous()

