"""Kernel layer (DESIGN §6): every kernel against a float64 brute force.

On CPU the Triton kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 when CUDA is absent),
fp32 (plus a bf16/fp16-input smoke test: the interpreter upcasts tiles). Tests marked `gpu` run the compiled
kernels in fp32, bf16 and fp16 and are skipped without CUDA. Tolerances per dtype: `kernel_helpers.RTOL`,
relative to the magnitude of each sum. Every test draws fresh inputs from a seed derived from its own id.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernel_helpers import (  # noqa: E402
    RTOL,
    assert_matches,
    brute_bilinear,
    brute_fisher,
    brute_ghost,
    d64,
    randn,
    seed_for,
)

import alphatoken.kernels as K  # noqa: E402
from alphatoken.kernels import gate  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
needs_triton = pytest.mark.skipif(
    K.backend_for(torch.empty(0, device=DEVICE)) != "triton",
    reason="Triton cannot run here (no CUDA and TRITON_INTERPRET unset, or Triton missing)",
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRET, reason="compiled Triton needs a CUDA device (none here)"
)

# (N, d_in, d_out): one realistic shape, then odd ones — a single row, primes, tiny d (< 16), ragged blocks.
SHAPES = [(256, 128, 96), (1, 5, 3), (123, 77, 45), (37, 16, 33), (64, 200, 7), (2, 1, 1)]
SHAPE_IDS = [f"N{n}-din{i}-dout{o}" for n, i, o in SHAPES]


@pytest.fixture
def gen(request):
    return torch.Generator().manual_seed(seed_for(request))


@pytest.fixture(autouse=True)
def _fresh_counts():
    K.reset_launch_counts()
    yield


def _matrices(gen, kind, d_out, d_in, dtype=torch.float32, device=DEVICE):
    """(M argument, list of the K matrices) for kind 'single', 'stack3' or 'list3'."""
    if kind == "single":
        M = randn(gen, d_out, d_in, dtype=dtype, device=device)
        return M, [M]
    if kind == "stack3":
        M = randn(gen, 3, d_out, d_in, dtype=dtype, device=device)
        return M, list(M)
    if kind == "list3":
        mats = [randn(gen, d_out, d_in, dtype=dtype, device=device) for _ in range(3)]
        return mats, mats
    # 'list_mixed': separate tensors with different strides -> the kernel's offset/stride-table path.
    mats = [
        randn(gen, d_out, d_in, dtype=dtype, device=device),
        randn(gen, d_in, d_out, dtype=dtype, device=device).T,
        randn(gen, d_out, 2 * d_in, dtype=dtype, device=device)[:, ::2],
    ]
    return mats, mats


def _fisher(gen, d_out, d_in, dtype=torch.float32, device=DEVICE):
    # A Fisher is non-negative; the kernel does not rely on it, the brute force magnitude handles either sign.
    return randn(gen, d_out, d_in, dtype=dtype, device=device).abs()


def _check_bilinear(result, a, g, mats, single, rtol, what="bilinear"):
    expected = torch.stack([brute_bilinear(a, g, m)[0] for m in mats])
    magnitude = torch.stack([brute_bilinear(a, g, m)[1] for m in mats])
    if single:
        assert result.shape == (a.shape[0],)
        result = result.unsqueeze(0)
    else:
        assert result.shape == (len(mats), a.shape[0])
    assert result.dtype == torch.float32
    assert_matches(result, expected, magnitude, rtol, what)


# ---------------------------------------------------------------- interpreter (CPU) / compiled fp32 -----

@needs_triton
@pytest.mark.parametrize("kind", ["single", "stack3", "list3", "list_mixed"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_bilinear_matches_brute_force(gen, shape, kind):
    N, d_in, d_out = shape
    a, g = randn(gen, N, d_in, device=DEVICE), randn(gen, N, d_out, device=DEVICE)
    M, mats = _matrices(gen, kind, d_out, d_in)
    result = K.bilinear(a, g, M)
    _check_bilinear(result, a, g, mats, kind == "single", RTOL[torch.float32])
    assert K.launch_counts() == {"bilinear": 1}  # K matrices in one launch


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_fisher_norm_matches_brute_force(gen, shape):
    N, d_in, d_out = shape
    a, g = randn(gen, N, d_in, device=DEVICE), randn(gen, N, d_out, device=DEVICE)
    F = _fisher(gen, d_out, d_in)
    result = K.fisher_norm(a, g, F)
    expected, magnitude = brute_fisher(a, g, F)
    assert result.shape == (N,) and result.dtype == torch.float32
    assert_matches(result, expected, magnitude, RTOL[torch.float32], "fisher_norm")
    assert K.launch_counts() == {"bilinear": 1}


@needs_triton
@pytest.mark.parametrize("kind", ["single", "stack3", "list3", "list_mixed"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=SHAPE_IDS[:3])
def test_bilinear_fisher_norm_one_launch(gen, shape, kind):
    N, d_in, d_out = shape
    a, g = randn(gen, N, d_in, device=DEVICE), randn(gen, N, d_out, device=DEVICE)
    M, mats = _matrices(gen, kind, d_out, d_in)
    F = randn(gen, d_out, d_in, device=DEVICE)  # signed on purpose: the kernel must not assume F ≥ 0
    forms, norms = K.bilinear_fisher_norm(a, g, M, F)
    _check_bilinear(forms, a, g, mats, kind == "single", RTOL[torch.float32], "fused bilinear")
    expected, magnitude = brute_fisher(a, g, F)
    assert_matches(norms, expected, magnitude, RTOL[torch.float32], "fused fisher")
    assert K.launch_counts() == {"bilinear": 1}


@needs_triton
@pytest.mark.parametrize("V", [1, 37, 100])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_ghost_dot_matches_brute_force(gen, shape, V):
    N, d_in, d_out = shape
    a, g = randn(gen, N, d_in, device=DEVICE), randn(gen, N, d_out, device=DEVICE)
    a_ref, g_ref = randn(gen, V, d_in, device=DEVICE), randn(gen, V, d_out, device=DEVICE)
    result = K.ghost_dot(a, g, a_ref, g_ref)
    expected, magnitude = brute_ghost(a, g, a_ref, g_ref)
    assert result.shape == (N,) and result.dtype == torch.float32
    assert_matches(result, expected, magnitude, RTOL[torch.float32], "ghost_dot")
    assert K.launch_counts() == {"ghost_dot": 1}


@needs_triton
def test_ghost_dot_empty_reference_is_zero(gen):
    a, g = randn(gen, 9, 20, device=DEVICE), randn(gen, 9, 18, device=DEVICE)
    result = K.ghost_dot(a, g, a[:0], g[:0])
    assert torch.equal(result, torch.zeros(9, device=DEVICE))


@needs_triton
@pytest.mark.parametrize("split", [1, 2, 3])
def test_small_blocks_and_reduction_split(gen, split):
    """Force 16-wide blocks (many ragged blocks on every axis) and split the reduction across programs."""
    N, d_in, d_out, V = 41, 53, 70, 50
    a, g = randn(gen, N, d_in, device=DEVICE), randn(gen, N, d_out, device=DEVICE)
    M, mats = _matrices(gen, "stack3", d_out, d_in)
    F = _fisher(gen, d_out, d_in)
    a_ref, g_ref = randn(gen, V, d_in, device=DEVICE), randn(gen, V, d_out, device=DEVICE)
    with K.kernel_config("bilinear", BLOCK_N=16, BLOCK_O=16, BLOCK_I=16, split=split), \
            K.kernel_config("ghost_dot", BLOCK_N=16, BLOCK_V=16, BLOCK_D=16, split=split):
        forms, norms = K.bilinear_fisher_norm(a, g, M, F)
        ghost = K.ghost_dot(a, g, a_ref, g_ref)
    _check_bilinear(forms, a, g, mats, False, RTOL[torch.float32])
    assert_matches(norms, *brute_fisher(a, g, F), RTOL[torch.float32], "fisher (split)")
    assert_matches(ghost, *brute_ghost(a, g, a_ref, g_ref), RTOL[torch.float32], "ghost_dot (split)")
    assert K.launch_counts() == {"bilinear": 1, "ghost_dot": 1}


@needs_triton
def test_non_contiguous_inputs(gen):
    """Transposed views and strided slices are read through their strides and give the same values."""
    N, d_in, d_out, V = 45, 38, 29, 23
    a = randn(gen, d_in, N, device=DEVICE).T                       # transposed view: strides (1, N)
    g = randn(gen, 2 * N, d_out + 3, device=DEVICE)[::2, 1:d_out + 1]  # strided rows, offset columns
    M_t = randn(gen, 2, d_in, d_out, device=DEVICE).transpose(1, 2)  # stack of transposed matrices
    F = randn(gen, d_out, 2 * d_in, device=DEVICE).abs()[:, ::2]     # strided columns
    a_ref = randn(gen, d_in, V, device=DEVICE).T
    g_ref = randn(gen, V, 2 * d_out, device=DEVICE)[:, d_out:]
    assert not (a.is_contiguous() or g.is_contiguous() or M_t.is_contiguous() or F.is_contiguous())
    forms, norms = K.bilinear_fisher_norm(a, g, M_t, F)
    _check_bilinear(forms, a, g, list(M_t), False, RTOL[torch.float32])
    assert_matches(norms, *brute_fisher(a, g, F), RTOL[torch.float32], "fisher (strided)")
    single = K.bilinear(a, g, M_t[1])
    _check_bilinear(single, a, g, [M_t[1]], True, RTOL[torch.float32])
    repeated = K.bilinear(a, g, [M_t[1], M_t[1], M_t[0]])  # step 0 then back: offset-table path
    _check_bilinear(repeated, a, g, [M_t[1], M_t[1], M_t[0]], False, RTOL[torch.float32])
    ghost = K.ghost_dot(a, g, a_ref, g_ref)
    assert_matches(ghost, *brute_ghost(a, g, a_ref, g_ref), RTOL[torch.float32], "ghost (strided)")
    assert K.launch_counts() == {"bilinear": 3, "ghost_dot": 1}


def test_matrix_layouts():
    """Stacks and `list(stack)` use scalar strides; unrelated tensors use the offset/stride tables."""
    from alphatoken.kernels.bilinear import _matrix_layout

    stack = torch.zeros(3, 4, 5)
    base, step, strides, table = _matrix_layout(list(stack), "cpu")
    assert base.data_ptr() == stack.data_ptr() and step == 20 and strides == (5, 1) and table is None
    assert _matrix_layout([stack[0], stack[0]], "cpu")[1:] == (0, (5, 1), None)
    mixed = [torch.zeros(4, 5), torch.zeros(5, 4).T]
    _, _, _, table = _matrix_layout(mixed, "cpu")
    assert table is not None and table[1].tolist() == [5, 1, 1, 4]


@needs_triton
def test_outputs_poisoned_with_nan_are_fully_written(gen):
    N, d_in, d_out, V = 77, 31, 45, 19
    a, g = randn(gen, N, d_in, device=DEVICE), randn(gen, N, d_out, device=DEVICE)
    M, mats = _matrices(gen, "stack3", d_out, d_in)
    F = _fisher(gen, d_out, d_in)
    a_ref, g_ref = randn(gen, V, d_in, device=DEVICE), randn(gen, V, d_out, device=DEVICE)
    nan = float("nan")
    out_k = torch.full((3, N), nan, device=DEVICE)
    out_1 = torch.full((N,), nan, device=DEVICE)
    out_f = torch.full((N,), nan, device=DEVICE)
    out_g = torch.full((N,), nan, device=DEVICE)
    forms, norms = K.bilinear_fisher_norm(a, g, M, F, out=out_k, out_fisher=out_f)
    assert forms.data_ptr() == out_k.data_ptr() and norms.data_ptr() == out_f.data_ptr()
    one = K.bilinear(a, g, mats[0], out=out_1)
    ghost = K.ghost_dot(a, g, a_ref, g_ref, out=out_g)
    for t in (out_k, out_1, out_f, out_g):
        assert torch.isfinite(t).all()
    _check_bilinear(forms, a, g, mats, False, RTOL[torch.float32])
    _check_bilinear(one, a, g, mats[:1], True, RTOL[torch.float32])
    assert_matches(norms, *brute_fisher(a, g, F), RTOL[torch.float32], "fisher (out=)")
    assert_matches(ghost, *brute_ghost(a, g, a_ref, g_ref), RTOL[torch.float32], "ghost (out=)")
    # Split partial buffers are poisoned too (fresh NaN allocations): nothing may leak through.
    with K.kernel_config("bilinear", BLOCK_N=16, BLOCK_O=16, BLOCK_I=16, split=3):
        out_k.fill_(nan)
        K.bilinear(a, g, M, out=out_k)
    assert torch.isfinite(out_k).all()
    _check_bilinear(out_k, a, g, mats, False, RTOL[torch.float32])


@needs_triton
def test_empty_batch_is_one_empty_launch(gen):
    """N = 0 takes the Triton path like any N: one launch on an empty grid per call, an empty fp32 result."""
    a, g = randn(gen, 0, 12, device=DEVICE), randn(gen, 0, 7, device=DEVICE)
    M = randn(gen, 7, 12, device=DEVICE)
    a_ref, g_ref = randn(gen, 5, 12, device=DEVICE), randn(gen, 5, 7, device=DEVICE)
    results = [
        K.bilinear(a, g, M),
        K.bilinear(a, g, torch.stack([M, M])),
        *K.bilinear_fisher_norm(a, g, [M, M, M], M.abs()),
        K.fisher_norm(a, g, M),
        K.ghost_dot(a, g, a_ref, g_ref),
        K.target_dot(a, g, a_ref, g_ref, form="materialized"),
    ]
    assert [tuple(r.shape) for r in results] == [(0,), (2, 0), (3, 0), (0,), (0,), (0,), (0,)]
    assert all(r.dtype == torch.float32 for r in results)
    assert K.launch_counts() == {"bilinear": 5, "ghost_dot": 1}
    assert K.bilinear(a, g, M, out=torch.empty(0, device=DEVICE)).shape == (0,)


# Fresh odd shapes with every kind of operand DESIGN §6.2 accepts, at once: K up to 5, d = 1 on either side,
# 16-bit rows with a matrix of the other 16-bit dtype, reference rows in a third dtype, transposed / strided /
# broadcast (stride-0) views. (N, d_in, d_out, K, V, row dtype, matrix dtype, reference dtype)
MIXED = [
    (45, 65, 3, 5, 129, torch.bfloat16, torch.float32, torch.float16),
    (17, 1, 129, 2, 63, torch.float16, torch.bfloat16, torch.float32),
    (130, 31, 1, 1, 5, torch.float32, torch.float16, torch.bfloat16),
    (2, 100, 31, 3, 1, torch.bfloat16, torch.float16, torch.bfloat16),
]


@needs_triton
@pytest.mark.parametrize("case", MIXED, ids=[f"N{c[0]}-din{c[1]}-dout{c[2]}-K{c[3]}-V{c[4]}" for c in MIXED])
def test_odd_shapes_mixed_dtypes_and_views(gen, case):
    N, d_in, d_out, n_mat, V, dtype, m_dtype, r_dtype = case
    rtol = max(RTOL[dtype], RTOL[m_dtype], RTOL[r_dtype])
    a = randn(gen, d_in, N, dtype=dtype, device=DEVICE).T                          # transposed view
    g = randn(gen, 2 * N, d_out + 1, dtype=dtype, device=DEVICE)[::2, 1:]          # strided rows, offset
    stack = randn(gen, n_mat, d_in, d_out, dtype=m_dtype, device=DEVICE).transpose(1, 2)
    mats = [stack[k] if k % 2 else randn(gen, d_out, 2 * d_in, dtype=m_dtype, device=DEVICE)[:, 1::2]
            for k in range(n_mat)]                                                 # table path for K > 1
    F = randn(gen, d_in, d_out, device=DEVICE).abs().T
    a_ref = randn(gen, 2 * V, d_in, dtype=r_dtype, device=DEVICE)[1::2]
    g_ref = randn(gen, d_out, V, dtype=r_dtype, device=DEVICE).T
    nan = float("nan")
    out_s, out_l = torch.full((n_mat, N), nan, device=DEVICE), torch.full((n_mat, N), nan, device=DEVICE)
    out_f, out_g = torch.full((N,), nan, device=DEVICE), torch.full((N,), nan, device=DEVICE)
    out_m = torch.full((n_mat, N), nan, device=DEVICE)
    K.bilinear(a, g, stack, out=out_s)
    K.bilinear(a, g, mats, out=out_l)
    forms, norms = K.bilinear_fisher_norm(a, g, mats, F, out=out_m, out_fisher=out_f)
    single = K.bilinear(a, g, mats[0])
    ghost = K.ghost_dot(a, g, a_ref, g_ref, out=out_g)
    a_bcast = randn(gen, 1, d_in, dtype=dtype, device=DEVICE).expand(N, d_in)     # stride 0 along N
    _check_bilinear(K.bilinear(a_bcast, g, stack), a_bcast, g, list(stack), False, rtol, "broadcast rows")
    assert K.launch_counts() == {"bilinear": 5, "ghost_dot": 1}
    _check_bilinear(out_s, a, g, list(stack), False, rtol, "stack")
    _check_bilinear(out_l, a, g, mats, False, rtol, "list")
    _check_bilinear(forms, a, g, mats, False, rtol, "fused bilinear")
    _check_bilinear(single, a, g, mats[:1], True, rtol, "single")
    assert_matches(norms, *brute_fisher(a, g, F), rtol, "fused fisher")
    expected, magnitude = brute_ghost(a, g, a_ref, g_ref)
    assert_matches(ghost, expected, magnitude, rtol, "ghost_dot")
    K.reset_launch_counts()
    for form, op in (("ghost", "ghost_dot"), ("materialized", "bilinear"), (None, None)):
        op = op or ("ghost_dot" if K.use_ghost(V, d_in, d_out) else "bilinear")
        before = K.launch_counts().get(op, 0)
        result = K.target_dot(a, g, a_ref, g_ref, scale=-2.0, form=form)
        assert K.launch_counts().get(op, 0) == before + 1, (form, K.launch_counts())
        assert result.shape == (N,) and result.dtype == torch.float32
        assert_matches(result, -2.0 * expected, 2.0 * magnitude, 4 * rtol, f"target_dot ({form})")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_and_mixed_matrix_dtype(gen, dtype):
    """16-bit token rows with a 16-bit or an fp32 matrix (interpreter: tiles upcast; GPU: see gpu tests)."""
    N, d_in, d_out, V = 50, 40, 24, 30
    a, g = randn(gen, N, d_in, dtype=dtype, device=DEVICE), randn(gen, N, d_out, dtype=dtype, device=DEVICE)
    M16 = randn(gen, d_out, d_in, dtype=dtype, device=DEVICE)
    M32 = randn(gen, 2, d_out, d_in, device=DEVICE)
    F = _fisher(gen, d_out, d_in)
    _check_bilinear(K.bilinear(a, g, M16), a, g, [M16], True, RTOL[dtype])
    _check_bilinear(K.bilinear(a, g, [M16, M32[0]]), a, g, [M16, M32[0]], False, RTOL[dtype])  # mixed list
    forms, norms = K.bilinear_fisher_norm(a, g, M32, F)
    _check_bilinear(forms, a, g, list(M32), False, RTOL[dtype])
    assert_matches(norms, *brute_fisher(a, g, F), RTOL[dtype], "fisher (16-bit a, g)")
    a_ref, g_ref = randn(gen, V, d_in, device=DEVICE), randn(gen, V, d_out, device=DEVICE)  # fp32 refs
    assert_matches(K.ghost_dot(a, g, a_ref, g_ref), *brute_ghost(a, g, a_ref, g_ref), RTOL[dtype], "ghost (mixed)")
    assert K.launch_counts() == {"bilinear": 3, "ghost_dot": 1}


@needs_triton
def test_reference_backend_does_not_count_launches(gen):
    a, g = randn(gen, 20, 9, device=DEVICE), randn(gen, 20, 6, device=DEVICE)
    M = randn(gen, 6, 9, device=DEVICE)
    with K.use_backend("reference"):
        ref = K.bilinear(a, g, M)
        K.ghost_dot(a, g, a, g)
        K.bilinear_fisher_norm(a, g, M, M.abs())
    assert K.launch_counts() == {}
    tri = K.bilinear(a, g, M)
    assert K.launch_counts() == {"bilinear": 1}
    assert_matches(ref, *brute_bilinear(a, g, M), RTOL[torch.float32], "reference backend")
    assert_matches(tri, *brute_bilinear(a, g, M), RTOL[torch.float32], "triton backend")


# ---------------------------------------------------------------- dispatcher -----

def test_use_ghost_cost_rule():
    assert K.use_ghost(10, 100, 100)          # 10·200 < 10^4
    assert not K.use_ghost(50, 100, 100)      # 50·200 = 10^4: not cheaper
    assert not K.use_ghost(51, 100, 100)
    assert K.use_ghost(0, 3, 3)
    assert not K.use_ghost(1, 1, 1)           # 1·2 > 1


@needs_triton
@pytest.mark.parametrize("V, expected_form", [(5, "ghost"), (60, "materialized")])
def test_target_dot_dispatch_and_agreement(gen, V, expected_form):
    N, d_in, d_out = 33, 40, 24   # ghost iff V·64 < 960, i.e. V < 15
    a, g = randn(gen, N, d_in, device=DEVICE), randn(gen, N, d_out, device=DEVICE)
    a_ref, g_ref = randn(gen, V, d_in, device=DEVICE), randn(gen, V, d_out, device=DEVICE)
    expected, magnitude = brute_ghost(a, g, a_ref, g_ref)
    chosen = K.target_dot(a, g, a_ref, g_ref, scale=0.5)
    op = "ghost_dot" if expected_form == "ghost" else "bilinear"
    assert K.launch_counts() == {op: 1}
    assert_matches(chosen, 0.5 * expected, 0.5 * magnitude, 4 * RTOL[torch.float32], "target_dot (chosen)")
    ghost = K.target_dot(a, g, a_ref, g_ref, form="ghost")
    mat = K.target_dot(a, g, a_ref, g_ref, form="materialized")
    # The materialized side rounds G'ᵀA' to fp32 first: allow for that in its magnitude.
    assert_matches(ghost, expected, magnitude, 4 * RTOL[torch.float32], "target_dot ghost")
    assert_matches(mat, expected, magnitude, 4 * RTOL[torch.float32], "target_dot materialized")
    with pytest.raises(ValueError, match="form"):
        K.target_dot(a, g, a_ref, g_ref, form="dense")


# ---------------------------------------------------------------- references vs brute force -----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_references_match_brute_force(gen, dtype):
    N, d_in, d_out, V = 29, 23, 17, 11
    rtol = 1e-12 if dtype == torch.float64 else RTOL[torch.float32]
    a, g = randn(gen, N, d_in).to(dtype), randn(gen, N, d_out).to(dtype)
    M = randn(gen, 3, d_out, d_in).to(dtype)
    F = randn(gen, d_out, d_in).to(dtype)
    a_ref, g_ref = randn(gen, V, d_in).to(dtype), randn(gen, V, d_out).to(dtype)
    bil = K.bilinear_reference(a, g, M)
    for k in range(3):
        assert_matches(bil[k], *brute_bilinear(a, g, M[k]), rtol, "bilinear_reference")
    assert_matches(K.fisher_norm_reference(a, g, F), *brute_fisher(a, g, F), rtol, "fisher_norm_reference")
    assert_matches(K.ghost_dot_reference(a, g, a_ref, g_ref), *brute_ghost(a, g, a_ref, g_ref), rtol,
                   "ghost_dot_reference")
    mat = K.materialize_reference(a_ref, g_ref)
    truth = sum(d64(g_ref)[v][:, None] * d64(a_ref)[v][None, :] for v in range(V))
    assert_matches(mat, truth, torch.einsum("vo,vi->oi", d64(g_ref).abs(), d64(a_ref).abs()), rtol, "materialize")


# ---------------------------------------------------------------- gate -----

class _FakeCuda:
    """Stands in for a CUDA tensor: the gate reads only `.is_cuda` and `.dtype`."""
    is_cuda = True

    def __init__(self, dtype=torch.float32):
        self.dtype = dtype


def test_gate_three_decisions(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("ALPHATOKEN_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gate.backend_for(cpu) == ("triton" if gate.TRITON_AVAILABLE else "reference")   # interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert gate.backend_for(cpu) == "reference"                                           # plain CPU
    assert gate.backend_for(_FakeCuda()) == ("triton" if gate.TRITON_AVAILABLE else "reference")  # compiled
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with K.use_backend("reference"):
        assert gate.backend_for(cpu) == "reference"
    monkeypatch.setenv("ALPHATOKEN_KERNELS", "reference")
    assert gate.backend_for(cpu) == "reference"
    assert gate.backend_for(_FakeCuda()) == "reference"
    monkeypatch.setenv("ALPHATOKEN_KERNELS", "auto")
    assert gate.backend_for(cpu.double()) == "reference"                                  # float64: exact reference
    assert gate.backend_for(_FakeCuda(torch.float64)) == "reference"
    assert gate.backend_for(cpu, cpu.double()) == "reference"
    with K.use_backend("triton"), pytest.raises(RuntimeError, match="float64"):
        gate.backend_for(cpu.double())
    monkeypatch.setenv("ALPHATOKEN_KERNELS", "bogus")
    with pytest.raises(ValueError, match="ALPHATOKEN_KERNELS"):
        gate.backend_for(cpu)
    with pytest.raises(ValueError, match="backend"):
        with K.use_backend("fast"):
            pass


def test_plain_cpu_runs_reference_without_launches(gen, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a, g = randn(gen, 8, 5), randn(gen, 8, 4)
    M = randn(gen, 4, 5)
    result = K.bilinear(a, g, M)
    assert K.launch_counts() == {}
    assert_matches(result, *brute_bilinear(a, g, M), RTOL[torch.float32], "reference fallback")


def test_float64_goes_through_the_gate_to_the_reference_in_float64(gen, monkeypatch):
    """float64 (the engine's exact checks) is answered by the reference, in float64, even under the
    interpreter: the launchers take it, the gate routes it, no second dispatcher is needed."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    N, d_in, d_out, V = 13, 7, 5, 3
    a, g = randn(gen, N, d_in).double(), randn(gen, N, d_out).double()
    M, F = randn(gen, 2, d_out, d_in).double(), randn(gen, d_out, d_in).abs().double()
    M32 = randn(gen, d_out, d_in)
    a_ref, g_ref = randn(gen, V, d_in).double(), randn(gen, V, d_out).double()
    forms, norm = K.bilinear_fisher_norm(a, g, [M[0], M32, M[1]], F)  # a mixed list promotes to float64
    single = K.bilinear(a, g, M[1])
    ghost = K.ghost_dot(a, g, a_ref, g_ref)
    assert K.launch_counts() == {}
    for got in (forms, norm, single, ghost, K.fisher_norm(a, g, F), K.target_dot(a, g, a_ref, g_ref)):
        assert got.dtype == torch.float64
    for k, m in enumerate([M[0], M32.double(), M[1]]):
        assert_matches(forms[k], *brute_bilinear(a, g, m), 1e-12, f"float64 bilinear[{k}]")
    assert_matches(single, *brute_bilinear(a, g, M[1]), 1e-12, "float64 bilinear")
    assert_matches(norm, *brute_fisher(a, g, F), 1e-12, "float64 fisher")
    assert_matches(ghost, *brute_ghost(a, g, a_ref, g_ref), 1e-12, "float64 ghost")
    with pytest.raises(ValueError, match="out must be float64"):
        K.bilinear(a, g, M[0], out=torch.zeros(N))


# ---------------------------------------------------------------- validation -----

def _bad_inputs():
    a, g = torch.zeros(6, 5), torch.zeros(6, 4)
    M, F = torch.zeros(4, 5), torch.zeros(4, 5)
    ar, gr = torch.zeros(3, 5), torch.zeros(3, 4)
    meta = torch.zeros(6, 4, device="meta")
    return [
        ("g rows", lambda: K.bilinear(a, torch.zeros(7, 4), M), r"g must have the same number of rows.*\(6, d_out\)"),
        ("a 1-D", lambda: K.bilinear(torch.zeros(6), g, M), r"a must be 2-D.*\(N, d_in\)"),
        ("M shape", lambda: K.bilinear(a, g, torch.zeros(5, 4)), r"M must have shape \(d_out, d_in\) = \(4, 5\)"),
        ("M stack shape", lambda: K.bilinear(a, g, torch.zeros(2, 4, 6)), r"M must have shape .*\(4, 5\)"),
        ("M list item", lambda: K.bilinear(a, g, [M, torch.zeros(4, 4)]), r"M\[1\] must have shape .*\(4, 5\)"),
        ("M empty list", lambda: K.bilinear(a, g, []), r"M must be a \(4, 5\) tensor"),
        ("M None", lambda: K.bilinear(a, g, None), r"M must be a \(4, 5\) tensor.*got NoneType"),
        ("fused M None", lambda: K.bilinear_fisher_norm(a, g, None, F), r"M must be a \(4, 5\) tensor"),
        ("F None", lambda: K.fisher_norm(a, g, None), r"F must be a torch.Tensor of shape \(d_out, d_in\) = \(4, 5\)"),
        ("fused F None", lambda: K.bilinear_fisher_norm(a, g, M, None), r"F must be a torch.Tensor .*\(4, 5\)"),
        ("F shape", lambda: K.fisher_norm(a, g, torch.zeros(5, 4)), r"F must have shape \(d_out, d_in\) = \(4, 5\)"),
        ("F 3-D", lambda: K.fisher_norm(a, g, torch.zeros(1, 4, 5)), r"F must have shape \(d_out, d_in\) = \(4, 5\)"),
        ("fused F", lambda: K.bilinear_fisher_norm(a, g, M, torch.zeros(4, 6)), r"F must have shape .*\(4, 5\)"),
        ("g dtype", lambda: K.bilinear(a, g.half(), M), r"g must have the dtype of a \(torch.float32\).*\(6, d_out\)"),
        ("a int", lambda: K.bilinear(a.int(), g, M), r"a must be float32, bfloat16, float16 or float64.*\(N, d_in\)"),
        ("a float64, g float32", lambda: K.bilinear(a.double(), g, M), r"g must have the dtype of a \(torch.float64\)"),
        ("M int", lambda: K.bilinear(a, g, M.long()), r"M must be float32, bfloat16, float16 or float64.*\(4, 5\)"),
        ("g device", lambda: K.bilinear(a, meta, M), r"g \(shape \(6, d_out\)\) is on meta"),
        ("M device", lambda: K.bilinear(a, g, M.to("meta")), r"M \(shape .*\(4, 5\).*\) is on meta"),
        ("F device", lambda: K.fisher_norm(a, g, F.to("meta")), r"F \(shape .*\(4, 5\)\) is on meta"),
        ("a_ref d_in", lambda: K.ghost_dot(a, g, torch.zeros(3, 6), gr), r"a_ref must have shape \(V, d_in\) = \(V, 5\)"),
        ("g_ref shape", lambda: K.ghost_dot(a, g, ar, torch.zeros(2, 4)), r"g_ref must have shape \(V, d_out\) = \(3, 4\)"),
        ("g_ref dtype", lambda: K.ghost_dot(a, g, ar, gr.half()), r"g_ref must have the dtype of a_ref"),
        ("a_ref device", lambda: K.ghost_dot(a, g, ar.to("meta"), gr), r"a_ref \(shape \(3, 5\)\) is on meta"),
        ("target_dot", lambda: K.target_dot(a, g, ar, torch.zeros(3, 5)), r"g_ref must have shape \(V, d_out\) = \(3, 4\)"),
        ("out shape", lambda: K.bilinear(a, g, M, out=torch.zeros(5)), r"out must have shape \(6,\)"),
        ("out dtype", lambda: K.ghost_dot(a, g, ar, gr, out=torch.zeros(6, dtype=torch.float64)), r"out must be float32"),
        ("out device", lambda: K.ghost_dot(a, g, ar, gr, out=torch.zeros(6, device="meta")), r"out \(shape \(6,\)\) is on meta"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_inputs_raise_value_error_naming_argument(case):
    _, call, pattern = case
    with pytest.raises(ValueError, match=pattern):
        call()
    assert K.launch_counts() == {}


# ---------------------------------------------------------------- compiled on CUDA -----

GPU_SHAPES = [(256, 128, 96), (1, 5, 3), (123, 77, 45), (1000, 1024, 640), (4099, 257, 131)]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=[f"N{n}-din{i}-dout{o}" for n, i, o in GPU_SHAPES])
def test_gpu_compiled_all_kernels(gen, shape, dtype):
    N, d_in, d_out = shape
    V = 77
    dev = "cuda"
    a, g = randn(gen, N, d_in, dtype=dtype, device=dev), randn(gen, N, d_out, dtype=dtype, device=dev)
    M = randn(gen, 3, d_out, d_in, dtype=dtype, device=dev)
    M32 = randn(gen, d_out, d_in, device=dev)
    F = _fisher(gen, d_out, d_in, device=dev)
    a_ref, g_ref = randn(gen, V, d_in, dtype=dtype, device=dev), randn(gen, V, d_out, dtype=dtype, device=dev)
    rtol = RTOL[dtype]
    forms, norms = K.bilinear_fisher_norm(a, g, M, F)
    _check_bilinear(forms, a, g, list(M), False, rtol, "gpu fused bilinear")
    assert_matches(norms, *brute_fisher(a, g, F), rtol, "gpu fused fisher")
    _check_bilinear(K.bilinear(a, g, M32), a, g, [M32], True, rtol, "gpu bilinear (fp32 M)")
    _check_bilinear(K.bilinear(a.T.contiguous().T, g, [M[2], M[0]]), a, g, [M[2], M[0]], False, rtol, "gpu list")
    assert_matches(K.fisher_norm(a, g, F), *brute_fisher(a, g, F), rtol, "gpu fisher")
    ghost = K.ghost_dot(a, g, a_ref, g_ref)
    assert_matches(ghost, *brute_ghost(a, g, a_ref, g_ref), rtol, "gpu ghost")
    assert torch.equal(ghost, K.ghost_dot(a, g, a_ref, g_ref))            # deterministic
    assert torch.equal(forms, K.bilinear_fisher_norm(a, g, M, F)[0])
    assert K.launch_counts()["bilinear"] >= 4 and K.launch_counts()["ghost_dot"] >= 2


def test_backend_override_and_launch_counter_are_per_context():
    """use_backend / kernel_config / the launch counter live in contextvars: a thread started with its own empty
    context sees none of this thread's settings, and one started in a copy of this context sees all of them."""
    import contextvars
    import threading

    from alphatoken.kernels import gate, launch

    seen = {}

    def look(key):
        seen[key] = (gate.requested_backend(), dict(launch._OVERRIDES.get()), id(launch._COUNTS.get(None)))

    launch.reset_launch_counts()
    mine = id(launch._COUNTS.get())
    with gate.use_backend("reference"), launch.kernel_config("bilinear", BLOCK_N=16):
        bare = threading.Thread(target=look, args=("bare",))
        bare.start(), bare.join()
        context = contextvars.copy_context()
        copied = threading.Thread(target=context.run, args=(look, "copied"))
        copied.start(), copied.join()
        assert gate.requested_backend() == "reference"
    assert gate.requested_backend() != "reference" or __import__("os").environ.get("ALPHATOKEN_KERNELS") == "reference"
    assert seen["copied"] == ("reference", {"bilinear": {"BLOCK_N": 16}}, mine)
    assert seen["bare"][0] != "reference" or __import__("os").environ.get("ALPHATOKEN_KERNELS") == "reference"
    assert seen["bare"][1] == {} and seen["bare"][2] != mine
    assert launch._OVERRIDES.get() == {}
