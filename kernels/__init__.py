"""alphatoken.kernels — token-level ghost kernels (DESIGN §6).

Inputs are row-matched token matrices `a (N, d_in)` and `g (N, d_out)` (fp32, bf16 or fp16; any strides);
results are float32 with one value per row. float64 operands (exact checks, CPU studies) are accepted too:
the gate sends them to the plain-PyTorch reference, which returns float64.

    bilinear(a, g, M)                  g_tᵀ M_k a_t, one or several M in one pass over a and g
    fisher_norm(a, g, F)               (g_t⊙g_t)ᵀ F (a_t⊙a_t)
    bilinear_fisher_norm(a, g, M, F)   both of the above from one pass over a and g
    ghost_dot(a, g, a_ref, g_ref)      Σ_v (g_t·g'_v)(a_t·a'_v), never forming N×V
    target_dot(a, g, a_ref, g_ref)     the same value, ghost or materialized by cost (`use_ghost`)
    head_chunks / head_nll / head_grads   the LM head's NLL and w·(softmax − onehot) rows, chunk by chunk

Where each call runs is decided in `gate.py` alone. `launch_counts()` / `reset_launch_counts()` count the
Triton launches (a call answered by the reference does not count); `kernel_config(op, ...)` fixes block
sizes for a `with` block (tests, benchmarks). Block-size lists, the reduction split and determinism are
described in `launch.py`; tiling and roofline numbers in each kernel's docstring.
"""
import sys as _sys

from .gate import backend_for, interpreter_enabled, use_backend
from .bilinear import bilinear, bilinear_fisher_norm, fisher_norm
from .ghost_dot import ghost_dot
from .dispatch import target_dot, use_ghost
from .chunked_head import chunk_rows_for, head_chunks, head_grads, head_nll, head_rows
from .launch import kernel_config, launch_counts, reset_launch_counts
from .reference import (
    bilinear_reference,
    fisher_norm_reference,
    ghost_dot_reference,
    head_rows_reference,
    materialize_reference,
)

__all__ = [
    "bilinear",
    "fisher_norm",
    "bilinear_fisher_norm",
    "ghost_dot",
    "target_dot",
    "use_ghost",
    "backend_for",
    "interpreter_enabled",
    "use_backend",
    "launch_counts",
    "reset_launch_counts",
    "kernel_config",
    "bilinear_reference",
    "fisher_norm_reference",
    "ghost_dot_reference",
    "materialize_reference",
    "head_rows",
    "head_rows_reference",
    "head_chunks",
    "head_nll",
    "head_grads",
    "chunk_rows_for",
]

if __name__ == "kernels":  # imported by its bare name (the repository root on sys.path): see _shadow.py
    from ._shadow import hand_over

    hand_over(_sys.modules[__name__])
