"""Ghost dot-products of token rows against a reference set of rows (DESIGN §3 "validation" target, §6).

`ghost_dot(a, g, a_ref, g_ref)[t] = Σ_v (g_t·g'_v)(a_t·a'_v) = g_tᵀ (G'ᵀA') a_t` without forming either
the (d_out, d_in) matrix G'ᵀA' or the (N, V) score matrices: like flash-attention, each program holds a row
block ("queries") and streams the reference rows ("keys") in blocks of BLOCK_V, building the two
(BLOCK_N, BLOCK_V) Gram tiles S_a = a·A'ᵀ and S_g = g·G'ᵀ in fp32 registers and folding rowsum(S_g ⊙ S_a)
into a running (BLOCK_N,) sum. Unlike attention there is no softmax, so no rescaling is needed; and since
d can be thousands wide, the query tiles are re-read per key block (from L1/L2) instead of pinned in SRAM.

Dtypes: a and g share a dtype, a_ref and g_ref share a dtype (fp32, bf16 or fp16). When both pairs are the
same 16-bit dtype the dots run natively on tensor cores; otherwise tiles are upcast to fp32 in registers
and the dot runs with `FP32_DOT_PRECISION`. Accumulation and output fp32. Strides are passed through:
no copies of a, g, a_ref, g_ref.
"""
from __future__ import annotations

import torch

from .bilinear import FP32_DOT_PRECISION
from .gate import backend_for, result_dtype
from .launch import cdiv, choose_split, n_bucket, new_output, reduction_unit, run
from .reference import ghost_dot_reference
from .validate import check_refs

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None

if triton is not None:
    CONFIGS = [
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 32}, num_warps=8, num_stages=2),
    ]
else:  # pragma: no cover
    CONFIGS = []
DEFAULT = {"BLOCK_N": 32, "BLOCK_V": 32, "BLOCK_D": 32}


if triton is not None:

    @triton.jit
    def _gram_tile(
        x_ptr, stride_xn, stride_xd, rows, row_mask, y_ptr, stride_yv, stride_yd, offs_v, v_mask, D,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """S[t, v] = Σ_d x[t, d] y[v, d] for one (BLOCK_N, BLOCK_V) tile, fp32, looping over D in BLOCK_D."""
        s = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            d_mask = offs_d < D
            x = tl.load(x_ptr + rows[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            y = tl.load(y_ptr + offs_d[:, None] * stride_yd + offs_v[None, :] * stride_yv,
                        mask=d_mask[:, None] & v_mask[None, :], other=0.0)
            if DOT_FP32:
                s = tl.dot(x.to(tl.float32), y.to(tl.float32), s, input_precision=PRECISION)
            else:
                s = tl.dot(x, y, s)
        return s

    @triton.jit
    def _ghost_dot_kernel(
        a_ptr, g_ptr, ar_ptr, gr_ptr, out_ptr,
        N, V, D_IN, D_OUT, SLICE, n_bucket,
        stride_an, stride_ai, stride_gn, stride_go,
        stride_arv, stride_ari, stride_grv, stride_gro, stride_os,
        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """out[s, t] = Σ_{v ∈ slice s} (g_t·g'_v)(a_t·a'_v).

        Shapes: a (N, D_IN), g (N, D_OUT), a_ref (V, D_IN), g_ref (V, D_OUT); out (S, N) fp32, rows contiguous.
        Grid: (cdiv(N, BLOCK_N), S). Program (r, s) owns rows [r·BLOCK_N, (r+1)·BLOCK_N) and reference rows
        [s·SLICE, (s+1)·SLICE), streamed in BLOCK_V blocks; per block it builds S_a and S_g (tl.dot over d
        chunks, fp32 accumulators) and adds rowsum(S_a ⊙ S_g). Never forms N×V in memory; each output
        element is written once by one program (deterministic). Accumulation: fp32.

        FLOPs: 2·N·V·(D_IN + D_OUT) + 2·N·V.
        Bytes (HBM, compulsory): (N·s + V·s_ref)·(D_IN + D_OUT) + 4·N·S. The reference rows are streamed
        once per row block (cdiv(N, BLOCK_N) times, from L2 when they fit) and the query rows re-read per
        key block from L1/L2, exactly the traffic pattern of a GEMM of N×(d_in+d_out) by (d_in+d_out)×V.
        """
        pid_n = tl.program_id(0).to(tl.int64)
        pid_s = tl.program_id(1).to(tl.int64)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        v_lo = pid_s * SLICE
        v_hi = tl.minimum(v_lo + SLICE, V)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            v_mask = offs_v < v_hi
            s_a = _gram_tile(a_ptr, stride_an, stride_ai, rows, row_mask, ar_ptr, stride_arv, stride_ari,
                             offs_v, v_mask, D_IN, DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
            s_g = _gram_tile(g_ptr, stride_gn, stride_go, rows, row_mask, gr_ptr, stride_grv, stride_gro,
                             offs_v, v_mask, D_OUT, DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D)
            acc += tl.sum(s_a * s_g, axis=1)
        tl.store(out_ptr + pid_s * stride_os + rows, acc, mask=row_mask)


def ghost_dot(a: torch.Tensor, g: torch.Tensor, a_ref: torch.Tensor, g_ref: torch.Tensor, *,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """`out[t] = Σ_v (g_t·g'_v)(a_t·a'_v) = g_tᵀ (G'ᵀA') a_t` per row t: (N,) fp32, one launch.

    a (N, d_in), g (N, d_out), a_ref (V, d_in), g_ref (V, d_out); fp32/bf16/fp16 (a, g one dtype; a_ref,
    g_ref one dtype), any strides. Accumulated in fp32. V = 0 gives zeros; N = 0 an empty result (an
    empty-grid launch). `out`: optional contiguous fp32 (N,) buffer.
    FLOPs ≈ 2·N·V·(d_in + d_out); bytes ≈ (N + V)·(d_in + d_out)·s + 4·N.
    """
    N, V, d_in, d_out = check_refs(a, g, a_ref, g_ref)
    result = new_output((N,), a.device, out, "out", result_dtype(a, g, a_ref, g_ref))
    if backend_for(a, g, a_ref, g_ref) == "reference":
        return result.copy_(ghost_dot_reference(a, g, a_ref, g_ref))
    unit = reduction_unit("ghost_dot", CONFIGS, DEFAULT, "BLOCK_V")
    split, slice_len = choose_split("ghost_dot", a.device, N, V, unit)
    part = result.unsqueeze(0) if split == 1 else new_output((split, N), a.device)
    dot_fp32 = not (a.dtype == a_ref.dtype and a.dtype in (torch.bfloat16, torch.float16))
    if a.device.type != "cuda":  # the interpreter computes with numpy: fp32 dots only
        dot_fp32 = True

    def grid(meta):
        return (cdiv(N, meta["BLOCK_N"]), split)

    run(
        "ghost_dot", _ghost_dot_kernel, CONFIGS, DEFAULT, grid, a.device,
        a_ptr=a, g_ptr=g, ar_ptr=a_ref, gr_ptr=g_ref, out_ptr=part,
        N=N, V=V, D_IN=d_in, D_OUT=d_out, SLICE=slice_len, n_bucket=n_bucket(N),
        stride_an=a.stride(0), stride_ai=a.stride(1), stride_gn=g.stride(0), stride_go=g.stride(1),
        stride_arv=a_ref.stride(0), stride_ari=a_ref.stride(1),
        stride_grv=g_ref.stride(0), stride_gro=g_ref.stride(1), stride_os=part.stride(0),
        DOT_FP32=dot_fp32, PRECISION=FP32_DOT_PRECISION,
    )
    if split > 1:
        torch.sum(part, dim=0, out=result)
    return result
