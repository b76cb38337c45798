"""Bilinear forms `g_tᵀ M_k a_t` and Fisher norms `(g_t⊙g_t)ᵀ F (a_t⊙a_t)` over token rows (DESIGN §6).

One kernel, `_bilinear_kernel`, serves the three launchers: `bilinear` (K matrices), `fisher_norm` (F only)
and `bilinear_fisher_norm` (both, from one pass over a and g). The (N, d_out) product `a Mᵀ` is never
written: each program keeps a (BLOCK_N, BLOCK_O) tile of it in registers, folds it into row sums with the
matching g tile, and moves on.

Dtypes: `a` and `g` share one dtype (fp32, bf16 or fp16); each matrix may be any of the three (U and the
Fisher are often kept in fp32 next to bf16 activations). When a and M are the same 16-bit dtype the
tensor-core dot runs on them natively; otherwise the tiles are upcast to fp32 in registers and the dot runs
with `input_precision=FP32_DOT_PRECISION` ("tf32x3": fp32-level accuracy on tensor cores). The Fisher dot
always runs in fp32 on a² (squared in fp32) and F. Accumulation and output are fp32.

Strides: every tensor is addressed through its strides, so transposed views and strided slices are read
in place with no copy (a view whose last stride is not 1 loads uncoalesced on GPU: correct, slower).
A list of K matrices is not stacked either: matrices at a constant step (a stack, `list(stack)`) are
addressed by scalar strides; separate tensors through one base pointer, a (K,) table of element offsets
from it and a (K, 2) table of strides (one tiny host-to-device copy per call).
"""
from __future__ import annotations

import torch

from .gate import backend_for, result_dtype
from .launch import cdiv, choose_split, n_bucket, new_output, reduction_unit, run
from .reference import bilinear_reference, fisher_norm_reference
from .validate import check_matrix, check_rows, matrix_list

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None

# fp32 x fp32 dots on tensor cores: "tf32x3" keeps ~fp32 accuracy (3 TF32 MMAs); "tf32" is faster, coarser.
FP32_DOT_PRECISION = "tf32x3"

if triton is not None:
    CONFIGS = [
        triton.Config({"BLOCK_N": 64, "BLOCK_O": 64, "BLOCK_I": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_O": 64, "BLOCK_I": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_O": 64, "BLOCK_I": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_O": 128, "BLOCK_I": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_O": 128, "BLOCK_I": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32, "BLOCK_O": 64, "BLOCK_I": 64}, num_warps=4, num_stages=4),
    ]
else:  # pragma: no cover
    CONFIGS = []
# The one config for the interpreter and for ALPHATOKEN_AUTOTUNE=0 (32 keeps interpreter tiles small).
DEFAULT = {"BLOCK_N": 32, "BLOCK_O": 32, "BLOCK_I": 32}


if triton is not None:

    @triton.jit
    def _bilinear_pass(
        a_ptr, g_ptr, m_ptr, stride_mo, stride_mi, f_ptr, stride_fo, stride_fi,
        rows, row_mask, o_lo, o_hi, D_IN,
        stride_an, stride_ai, stride_gn, stride_go,
        WITH_M: tl.constexpr, WITH_F: tl.constexpr, M_FP32: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        """Row sums over d_out in [o_lo, o_hi) of `(a Mᵀ) ⊙ g` and `(a² Fᵀ) ⊙ g²` for one row block."""
        row_m = tl.zeros([BLOCK_N], dtype=tl.float32)
        row_f = tl.zeros([BLOCK_N], dtype=tl.float32)
        for o0 in range(o_lo, o_hi, BLOCK_O):
            offs_o = (o0 + tl.arange(0, BLOCK_O)).to(tl.int64)
            o_mask = offs_o < o_hi
            g = tl.load(
                g_ptr + rows[:, None] * stride_gn + offs_o[None, :] * stride_go,
                mask=row_mask[:, None] & o_mask[None, :], other=0.0,
            ).to(tl.float32)
            acc_m = tl.zeros([BLOCK_N, BLOCK_O], dtype=tl.float32)
            acc_f = tl.zeros([BLOCK_N, BLOCK_O], dtype=tl.float32)
            for i0 in range(0, D_IN, BLOCK_I):
                offs_i = (i0 + tl.arange(0, BLOCK_I)).to(tl.int64)
                i_mask = offs_i < D_IN
                a = tl.load(
                    a_ptr + rows[:, None] * stride_an + offs_i[None, :] * stride_ai,
                    mask=row_mask[:, None] & i_mask[None, :], other=0.0,
                )
                oi_mask = i_mask[:, None] & o_mask[None, :]
                if WITH_M:
                    # (BLOCK_I, BLOCK_O) tile of Mᵀ, read through M's strides.
                    m = tl.load(m_ptr + offs_i[:, None] * stride_mi + offs_o[None, :] * stride_mo, mask=oi_mask, other=0.0)
                    if M_FP32:
                        acc_m = tl.dot(a.to(tl.float32), m.to(tl.float32), acc_m, input_precision=PRECISION)
                    else:
                        acc_m = tl.dot(a, m, acc_m)
                if WITH_F:
                    a32 = a.to(tl.float32)
                    f = tl.load(f_ptr + offs_i[:, None] * stride_fi + offs_o[None, :] * stride_fo, mask=oi_mask, other=0.0)
                    acc_f = tl.dot(a32 * a32, f.to(tl.float32), acc_f, input_precision=PRECISION)
            if WITH_M:
                row_m += tl.sum(acc_m * g, axis=1)
            if WITH_F:
                row_f += tl.sum(acc_f * (g * g), axis=1)
        return row_m, row_f

    @triton.jit
    def _bilinear_kernel(
        a_ptr, g_ptr, m_ptr, m_off_ptr, m_stride_ptr, f_ptr, out_m_ptr, out_f_ptr,
        N, D_IN, D_OUT, K, SLICE, n_bucket,
        stride_an, stride_ai, stride_gn, stride_go, stride_fo, stride_fi,
        stride_mk, stride_mo, stride_mi,
        stride_os, stride_ok, stride_fs,
        HAS_M: tl.constexpr, HAS_F: tl.constexpr, M_TABLE: tl.constexpr, M_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    ):
        """out_m[s, k, t] = Σ_{o ∈ slice s} g[t, o] Σ_i M_k[o, i] a[t, i];  out_f[s, t] = the same with g², F, a².

        Shapes: a (N, D_IN), g (N, D_OUT), M_k (D_OUT, D_IN) at `m_ptr + k·stride_mk` with strides
        (stride_mo, stride_mi), or with M_TABLE at `m_ptr + m_off[k]` with strides `m_stride[k]`;
        F (D_OUT, D_IN); out_m (S, K, N), out_f (S, N), fp32, rows contiguous.
        Grid: (cdiv(N, BLOCK_N), S). Program (r, s) owns rows [r·BLOCK_N, (r+1)·BLOCK_N) and the d_out slice
        [s·SLICE, (s+1)·SLICE); it loops over d_out blocks and, inside, d_in blocks, accumulating the
        (BLOCK_N, BLOCK_O) tile of a Mᵀ in fp32 registers (tl.dot), then adds rowsum(tile ⊙ g_tile).
        The Fisher term rides on matrix 0's pass: same a and g tiles, squared in fp32 in registers.
        Accumulation: fp32. Each output element is written once by one program (deterministic).

        FLOPs: (K + [F]) · (2·N·D_IN·D_OUT + 2·N·D_OUT), + N·(D_IN + D_OUT) squarings with F.
        Bytes (HBM, compulsory): N·(D_IN·s_a + D_OUT·s_g) + (K·s_M + [F]·s_F)·D_OUT·D_IN + 4·(K + [F])·N·S.
        The matrices are streamed once per row block (cdiv(N, BLOCK_N) times, mostly served by L2 as the row
        blocks run together), like the B operand of a GEMM; a and g tiles are re-read per k and per d_out
        block from L1/L2. Arithmetic intensity ≈ 2·BLOCK_N FLOPs per matrix byte: compute-bound.
        """
        pid_n = tl.program_id(0).to(tl.int64)
        pid_s = tl.program_id(1).to(tl.int64)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        o_lo = pid_s * SLICE
        o_hi = tl.minimum(o_lo + SLICE, D_OUT)
        if HAS_M:
            if M_TABLE:
                m0_ptr = m_ptr + tl.load(m_off_ptr)
                m0_so = tl.load(m_stride_ptr)
                m0_si = tl.load(m_stride_ptr + 1)
            else:
                m0_ptr = m_ptr
                m0_so = stride_mo
                m0_si = stride_mi
        else:
            m0_ptr = m_ptr
            m0_so = stride_fo
            m0_si = stride_fi
        row_m, row_f = _bilinear_pass(
            a_ptr, g_ptr, m0_ptr, m0_so, m0_si, f_ptr, stride_fo, stride_fi,
            rows, row_mask, o_lo, o_hi, D_IN, stride_an, stride_ai, stride_gn, stride_go,
            HAS_M, HAS_F, M_FP32, PRECISION, BLOCK_N, BLOCK_O, BLOCK_I,
        )
        if HAS_F:
            tl.store(out_f_ptr + pid_s * stride_fs + rows, row_f, mask=row_mask)
        if HAS_M:
            out_ptr = out_m_ptr + pid_s * stride_os
            tl.store(out_ptr + rows, row_m, mask=row_mask)
            mk_ptr = m0_ptr
            for k in range(1, K):
                out_ptr += stride_ok
                if M_TABLE:
                    mk_ptr = m_ptr + tl.load(m_off_ptr + k)
                    mk_so = tl.load(m_stride_ptr + 2 * k)
                    mk_si = tl.load(m_stride_ptr + 2 * k + 1)
                else:  # pointer steps, not k * stride: no int32 overflow for big stacks
                    mk_ptr += stride_mk
                    mk_so = stride_mo
                    mk_si = stride_mi
                row_k, _unused = _bilinear_pass(
                    a_ptr, g_ptr, mk_ptr, mk_so, mk_si, f_ptr, stride_fo, stride_fi,
                    rows, row_mask, o_lo, o_hi, D_IN, stride_an, stride_ai, stride_gn, stride_go,
                    True, False, M_FP32, PRECISION, BLOCK_N, BLOCK_O, BLOCK_I,
                )
                tl.store(out_ptr + rows, row_k, mask=row_mask)


def _matrix_layout(mats: list[torch.Tensor], device):
    """How the kernel addresses M_k: (base, step, strides) when the matrices sit at a constant element step
    with one stride pair (a stack, one matrix, `list(stack)`), else (base, offsets (K,), strides (K, 2))
    tables for arbitrary separate tensors. The first form keeps strides as scalar kernel arguments, which
    Triton specializes (alignment, vectorized loads); the table form reads them at run time.
    """
    base = mats[0]
    size = base.element_size()
    offsets = [(m.data_ptr() - base.data_ptr()) // size for m in mats]
    step = offsets[1] if len(mats) > 1 else 0
    uniform = all(m.stride() == base.stride() for m in mats) and all(o == k * step for k, o in enumerate(offsets))
    if uniform:
        return base, step, base.stride(), None
    strides = [s for m in mats for s in m.stride()]
    off_t = torch.tensor(offsets, dtype=torch.int64).to(device, non_blocking=True)
    str_t = torch.tensor(strides, dtype=torch.int64).to(device, non_blocking=True)
    return base, 0, (0, 0), (off_t, str_t)


def _launch(a, g, mats, F, out_m, out_f):
    """Run `_bilinear_kernel` for K = len(mats) matrices (may be 0) and/or F; fills out_m (K, N), out_f (N,)."""
    N, d_in = a.shape
    d_out = g.shape[1]
    K = len(mats)
    has_m, has_f = K > 0, F is not None
    unit = reduction_unit("bilinear", CONFIGS, DEFAULT, "BLOCK_O")
    split, slice_len = choose_split("bilinear", a.device, N, d_out, unit)
    # Slices write partial rows; with one slice they write the result directly.
    part_m = part_f = None
    if has_m:
        part_m = out_m.unsqueeze(0) if split == 1 else new_output((split, K, N), a.device)
    if has_f:
        part_f = out_f.unsqueeze(0) if split == 1 else new_output((split, N), a.device)
    if has_m:
        base, step, m_strides, table = _matrix_layout(mats, a.device)
        m_fp32 = not (base.dtype == a.dtype and a.dtype in (torch.bfloat16, torch.float16))
    else:
        base, step, m_strides, table, m_fp32 = F, 0, (0, 0), None, True
    off_t, str_t = table if table is not None else (base, base)  # unused pointers when no table
    f_arg = F if has_f else a
    f_strides = F.stride() if has_f else (0, 0)
    if a.device.type != "cuda":  # the interpreter computes with numpy: fp32 dots only
        m_fp32 = True

    def grid(meta):
        return (cdiv(N, meta["BLOCK_N"]), split)

    run(
        "bilinear", _bilinear_kernel, CONFIGS, DEFAULT, grid, a.device,
        a_ptr=a, g_ptr=g, m_ptr=base, m_off_ptr=off_t, m_stride_ptr=str_t, f_ptr=f_arg,
        out_m_ptr=part_m if has_m else part_f, out_f_ptr=part_f if has_f else part_m,
        N=N, D_IN=d_in, D_OUT=d_out, K=max(K, 1), SLICE=slice_len, n_bucket=n_bucket(N),
        stride_an=a.stride(0), stride_ai=a.stride(1), stride_gn=g.stride(0), stride_go=g.stride(1),
        stride_fo=f_strides[0], stride_fi=f_strides[1],
        stride_mk=step, stride_mo=m_strides[0], stride_mi=m_strides[1],
        stride_os=part_m.stride(0) if has_m else 0, stride_ok=part_m.stride(1) if has_m else 0,
        stride_fs=part_f.stride(0) if has_f else 0,
        HAS_M=has_m, HAS_F=has_f, M_TABLE=table is not None, M_FP32=m_fp32, PRECISION=FP32_DOT_PRECISION,
    )
    if split > 1:
        if has_m:
            torch.sum(part_m, dim=0, out=out_m)
        if has_f:
            torch.sum(part_f, dim=0, out=out_f)


def _forms(a, g, M, F, out, out_fisher, *, with_m: bool, with_f: bool):
    """Shared body of the three launchers: validate, allocate, then reference or one Triton launch.

    `with_m` / `with_f` say which operands the launcher takes; a missing one (None) raises like any bad value.
    N = 0 takes the same path: the launch has an empty grid (no program runs) and returns the empty result.
    """
    N, d_in, d_out = check_rows(a, g)
    mats, single = matrix_list(M, d_out, d_in, a.device) if with_m else ([], False)
    if len({m.dtype for m in mats}) > 1:  # one base pointer needs one dtype: promote (copies the 16-bit ones)
        wide = result_dtype(*mats)
        mats = [m.to(wide) for m in mats]
    if with_f:
        check_matrix("F", F, d_out, d_in, a.device, dims=(2,))
    K = len(mats)
    operands = (a, g, *mats, *([F] if with_f else []))
    dtype = result_dtype(*operands)
    out_m = None
    if with_m:
        out_m = new_output((N,) if single else (K, N), a.device, out, "out", dtype)
        out_m = out_m.view(1, N) if single else out_m
    out_f = new_output((N,), a.device, out_fisher, "out_fisher", dtype) if with_f else None
    if backend_for(*operands) == "reference":
        if with_m:
            out_m.copy_(bilinear_reference(a, g, torch.stack([m.to(dtype) for m in mats])))
        if with_f:
            out_f.copy_(fisher_norm_reference(a, g, F))
        return out_m, out_f
    _launch(a, g, mats, F, out_m, out_f)
    return out_m, out_f


def bilinear(a: torch.Tensor, g: torch.Tensor, M, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """`out[k, t] = g_tᵀ M_k a_t` for every row t, all K matrices in one launch.

    a (N, d_in), g (N, d_out): same dtype, fp32/bf16/fp16, any strides. M: one (d_out, d_in) matrix -> (N,);
    a (K, d_out, d_in) stack or a list of K (d_out, d_in) matrices -> (K, N) (a list of mixed dtypes is
    promoted to fp32, copying the 16-bit ones). Result fp32,
    accumulated in fp32. `out`: optional contiguous fp32 buffer of the result's shape (every element is
    written). FLOPs ≈ 2·K·N·d_in·d_out; bytes ≈ N·(d_in + d_out)·s + K·d_out·d_in·s_M + 4·K·N.
    """
    result, _ = _forms(a, g, M, None, out, None, with_m=True, with_f=False)
    return result if _is_stack(M) else result[0]


def fisher_norm(a: torch.Tensor, g: torch.Tensor, F: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """`out[t] = (g_t⊙g_t)ᵀ F (a_t⊙a_t) = ⟨F, (g_t a_tᵀ)²⟩`: (N,) fp32; squares taken and accumulated in fp32.

    a (N, d_in), g (N, d_out) as for `bilinear`; F (d_out, d_in), any float dtype and strides.
    FLOPs ≈ 2·N·d_in·d_out; bytes ≈ N·(d_in + d_out)·s + d_out·d_in·s_F + 4·N.
    """
    _, result = _forms(a, g, None, F, None, out, with_m=False, with_f=True)
    return result


def bilinear_fisher_norm(a: torch.Tensor, g: torch.Tensor, M, F: torch.Tensor, *, out=None, out_fisher=None):
    """`(bilinear(a, g, M), fisher_norm(a, g, F))` from one launch: one pass over a and g.

    Shapes as for `bilinear` (M) and `fisher_norm` (F); results fp32, accumulated in fp32.
    The Fisher dot shares matrix 0's a and g tiles (squared in registers), so a and g are read from memory
    once for both. FLOPs ≈ 2·(K + 1)·N·d_in·d_out; bytes ≈ N·(d_in + d_out)·s + (K + 1)·d_out·d_in·s_M + 4·(K + 1)·N.
    """
    out_m, out_f = _forms(a, g, M, F, out, out_fisher, with_m=True, with_f=True)
    return (out_m[0] if not _is_stack(M) else out_m), out_f


def _is_stack(M) -> bool:
    return not (isinstance(M, torch.Tensor) and M.dim() == 2)
