"""Kernels in the style of the public NKI tutorials run in the emulator and match NumPy references."""

import ml_dtypes
import nki
import nki.isa as nisa
import nki.language as nl
import numpy as np
import pytest

from nki_emulator import run

SEED = 1234
PMAX = nl.tile_size.pmax


# --- matmul: K tiles accumulated in PSUM ---------------------------------------------------------------------------
@nki.jit
def matmul_tiled(lhsT, rhs):
    """lhsT [K, M], rhs [K, N] -> [M, N] fp32; K by 128, M by 128, N by 512, ragged tails allowed."""
    K, M = lhsT.shape
    _, N = rhs.shape
    out = nl.ndarray((M, N), dtype=nl.float32, buffer=nl.shared_hbm)
    for m0 in range(0, M, PMAX):
        ms = min(PMAX, M - m0)
        for n0 in range(0, N, nl.tile_size.gemm_moving_fmax):
            ns = min(nl.tile_size.gemm_moving_fmax, N - n0)
            acc = nl.ndarray((ms, ns), dtype=nl.float32, buffer=nl.psum)
            for k0 in range(0, K, PMAX):
                ks = min(PMAX, K - k0)
                a = nl.ndarray((ks, ms), dtype=lhsT.dtype, buffer=nl.sbuf)
                b = nl.ndarray((ks, ns), dtype=rhs.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=a, src=lhsT[k0 : k0 + ks, m0 : m0 + ms])
                nisa.dma_copy(dst=b, src=rhs[k0 : k0 + ks, n0 : n0 + ns])
                nisa.nc_matmul(dst=acc, stationary=a, moving=b)
            res = nl.ndarray((ms, ns), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_copy(dst=res, src=acc)
            nisa.dma_copy(dst=out[m0 : m0 + ms, n0 : n0 + ns], src=res)
    return out


@pytest.mark.parametrize("K,M,N", [(128, 128, 512), (300, 130, 700), (7, 3, 5)])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_matmul_tiled_matches_numpy(K, M, N, dtype):
    rng = np.random.default_rng(SEED)
    a = rng.standard_normal((K, M)).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    out, report = run(matmul_tiled, a, b)
    ref = a.astype(np.float32).T @ b.astype(np.float32)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert report.macs == K * M * N
    assert report.instructions["tensor"] == -(-K // 128) * -(-M // 128) * -(-N // 512)


def test_matmul_explicit_accumulate_flag_matches_numpy():
    @nki.jit
    def kern(lhsT, rhs):
        out = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.shared_hbm)
        acc = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.psum)
        for i in range(3):
            a = nl.load(lhsT[i * 16 : (i + 1) * 16, :])
            b = nl.load(rhs[i * 16 : (i + 1) * 16, :])
            nisa.nc_matmul(dst=acc, stationary=a, moving=b, accumulate=(i > 0))
        nl.store(out, nl.copy(acc))
        return out

    rng = np.random.default_rng(SEED)
    a, b = rng.standard_normal((48, 4), dtype=np.float32), rng.standard_normal((48, 8), dtype=np.float32)
    out, _ = run(kern, a, b)
    np.testing.assert_allclose(out, a.T @ b, rtol=1e-5, atol=1e-5)


def test_nl_matmul_and_transpose_wrappers():
    @nki.jit
    def kern(x, y):
        out = nl.ndarray((x.shape[1], y.shape[1]), dtype=nl.float32, buffer=nl.shared_hbm)
        xt = nl.ndarray((x.shape[1], x.shape[0]), dtype=nl.float32, buffer=nl.shared_hbm)
        p = nl.matmul(nl.load(x), nl.load(y), transpose_x=True)
        nl.store(out, nl.copy(p))
        nl.store(xt, nl.copy(nl.transpose(nl.load(x))))
        return out, xt

    rng = np.random.default_rng(SEED)
    x, y = rng.standard_normal((33, 17), dtype=np.float32), rng.standard_normal((33, 65), dtype=np.float32)
    (out, xt), _ = run(kern, x, y)
    np.testing.assert_allclose(out, x.T @ y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(xt, x.T)


# --- RMSNorm with activation-reduce ---------------------------------------------------------------------------------
@nki.jit
def rmsnorm(x, w, eps):
    """x [T, H], w [1, H]; rows on partitions."""
    T, H = x.shape
    out = nl.ndarray((T, H), dtype=x.dtype, buffer=nl.shared_hbm)
    for r0 in range(0, T, PMAX):
        n = min(PMAX, T - r0)
        xt = nl.ndarray((n, H), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=xt, src=x[r0 : r0 + n, :])
        wt = nl.ndarray((n, H), dtype=w.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=wt, src=w.ap([[0, n], [1, H]]))  # broadcast the weight row to n partitions
        sq = nl.ndarray((n, H), dtype=nl.float32, buffer=nl.sbuf)
        ss = nl.ndarray((n, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(
            dst=sq, op=nl.square, data=xt, reduce_op=nl.add, reduce_res=ss, reduce_cmd=nisa.reduce_cmd.reset_reduce
        )
        rstd = nl.ndarray((n, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=rstd, data=ss, op0=nl.multiply, operand0=1.0 / H, op1=nl.add, operand1=eps)
        nisa.activation(dst=rstd, op=nl.rsqrt, data=rstd)
        y = nl.ndarray((n, H), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=y, data=xt, op0=nl.multiply, operand0=rstd)
        o = nl.ndarray((n, H), dtype=x.dtype, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=o, data1=y, data2=wt, op=nl.multiply)
        nisa.dma_copy(dst=out[r0 : r0 + n, :], src=o)
    return out


@pytest.mark.parametrize("T,H", [(1, 128), (129, 769), (7, 2048)])
def test_rmsnorm_matches_numpy(T, H):
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((T, H)).astype(ml_dtypes.bfloat16)
    w = rng.standard_normal((1, H)).astype(ml_dtypes.bfloat16)
    out, _ = run(rmsnorm, x, w, 1e-6)
    xf = x.astype(np.float32)
    ref = xf / np.sqrt((xf * xf).mean(axis=1, keepdims=True) + 1e-6) * w.astype(np.float32)
    assert out.dtype == ml_dtypes.bfloat16
    np.testing.assert_allclose(out.astype(np.float32), ref, rtol=1e-2, atol=1e-2)


def test_activation_reduce_accumulates_across_calls():
    @nki.jit
    def kern(x):
        out = nl.ndarray((x.shape[0], 1), dtype=nl.float32, buffer=nl.shared_hbm)
        t = nl.load(x)
        junk = nl.ndarray(t.shape, dtype=nl.float32, buffer=nl.sbuf)
        half = x.shape[1] // 2
        res = nl.ndarray((x.shape[0], 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(
            dst=junk[:, 0:half],
            op=nl.copy,
            data=t[:, 0:half],
            reduce_op=nl.add,
            reduce_cmd=nisa.reduce_cmd.reset_reduce,
        )
        nisa.activation(
            dst=junk[:, half:],
            op=nl.exp,
            data=t[:, half:],
            scale=2.0,
            bias=1.0,
            reduce_op=nl.add,
            reduce_res=res,
            reduce_cmd=nisa.reduce_cmd.reduce,
        )
        nl.store(out, res)
        return out

    x = np.random.default_rng(SEED).standard_normal((5, 10)).astype(np.float32)
    out, _ = run(kern, x)
    ref = x[:, :5].sum(1) + np.exp(2 * x[:, 5:] + 1).sum(1)
    np.testing.assert_allclose(out[:, 0], ref, rtol=1e-5)


# --- softmax -------------------------------------------------------------------------------------------------------
@nki.jit
def softmax_rows(x):
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    t = nl.load(x)
    neg_max = nl.ndarray((x.shape[0], 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=neg_max, op=nl.maximum, data=t, axis=1, negate=True)
    e = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.sbuf)
    s = nl.ndarray((x.shape[0], 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(
        dst=e, op=nl.exp, data=t, bias=neg_max, reduce_op=nl.add, reduce_res=s, reduce_cmd=nisa.reduce_cmd.reset_reduce
    )
    r = nl.ndarray((x.shape[0], 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=r, data=s)
    o = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=o, data=e, op0=nl.multiply, operand0=r)
    nl.store(out, o)
    return out


def _softmax_ref(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("shape", [(128, 128), (3, 1000), (1, 8)])
def test_softmax_matches_numpy(shape):
    x = (np.random.default_rng(SEED).standard_normal(shape) * 5).astype(np.float32)
    out, _ = run(softmax_rows, x)
    np.testing.assert_allclose(out, _softmax_ref(x), rtol=1e-5, atol=1e-7)


def test_nl_softmax_and_rms_norm_wrappers():
    @nki.jit
    def kern(x, w):
        a = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        b = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        t = nl.load(x)
        nl.store(a, nl.softmax(t, axis=1))
        nl.store(b, nl.rms_norm(t, nl.load(w), axis=1, n=x.shape[1]))
        return a, b

    rng = np.random.default_rng(SEED)
    x, w = rng.standard_normal((9, 33), dtype=np.float32), rng.standard_normal((9, 33), dtype=np.float32)
    (a, b), _ = run(kern, x, w)
    np.testing.assert_allclose(a, _softmax_ref(x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b, x / np.sqrt((x * x).mean(1, keepdims=True) + 1e-6) * w, rtol=1e-4, atol=1e-5)


# --- router top-8 with max8 / nc_find_index8 -----------------------------------------------------------------------
@nki.jit
def router_top8(logits):
    """logits [T, E] -> (weights [T, 8] renormalised softmax, ids [T, 8] uint32)."""
    T, E = logits.shape
    w_out = nl.ndarray((T, 8), dtype=nl.float32, buffer=nl.shared_hbm)
    i_out = nl.ndarray((T, 8), dtype=nl.uint32, buffer=nl.shared_hbm)
    x = nl.load(logits)
    top = nl.ndarray((T, 8), dtype=nl.float32, buffer=nl.sbuf)
    nisa.max8(dst=top, src=x)
    idx = nl.ndarray((T, 8), dtype=nl.uint32, buffer=nl.sbuf)
    nisa.nc_find_index8(dst=idx, data=x, vals=top)
    neg = nl.ndarray((T, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=neg, data=top[:, 0:1], op0=nl.multiply, operand0=-1.0)
    e = nl.ndarray((T, 8), dtype=nl.float32, buffer=nl.sbuf)
    s = nl.ndarray((T, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(
        dst=e, op=nl.exp, data=top, bias=neg, reduce_op=nl.add, reduce_res=s, reduce_cmd=nisa.reduce_cmd.reset_reduce
    )
    r = nl.ndarray((T, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=r, data=s)
    nisa.tensor_scalar(dst=e, data=e, op0=nl.multiply, operand0=r)
    nl.store(w_out, e)
    nl.store(i_out, idx)
    return w_out, i_out


@pytest.mark.parametrize("T,E", [(1, 128), (37, 128), (128, 60)])
def test_router_top8_matches_numpy(T, E):
    logits = np.random.default_rng(SEED).standard_normal((T, E)).astype(np.float32)
    (w, ids), _ = run(router_top8, logits)
    ref_ids = np.argsort(-logits, axis=1, kind="stable")[:, :8]
    np.testing.assert_array_equal(ids, ref_ids)
    top = np.take_along_axis(logits, ref_ids, 1)
    ref_w = np.exp(top - top[:, :1]) / np.exp(top - top[:, :1]).sum(1, keepdims=True)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5)


def test_nc_find_index8_pairs_duplicates_and_marks_missing():
    @nki.jit
    def kern(data, vals):
        out = nl.ndarray((1, 8), dtype=nl.uint32, buffer=nl.shared_hbm)
        idx = nl.ndarray((1, 8), dtype=nl.uint32, buffer=nl.sbuf)
        nisa.nc_find_index8(dst=idx, data=nl.load(data), vals=nl.load(vals))
        nl.store(out, idx)
        return out

    data = np.array([[5, 1, 5, 2, 5, 3, 0, 0, 9, 4]], dtype=np.float32)
    vals = np.array([[5, 5, 9, 5, 4, 3, 2, 7]], dtype=np.float32)
    out, _ = run(kern, data, vals)
    np.testing.assert_array_equal(out[0], [0, 2, 8, 4, 9, 5, 3, 0xFFFFFFFF])


# --- indirect DMA gather / scatter, scatter-add, paged KV ---------------------------------------------------------
@nki.jit
def gather_rows(data, indices):
    P, F = indices.shape[0], data.shape[1]
    out = nl.ndarray((P, F), dtype=data.dtype, buffer=nl.shared_hbm)
    idx = nl.ndarray((P, 1), dtype=nl.uint32, buffer=nl.sbuf)
    nisa.dma_copy(dst=idx, src=indices)
    dst = nl.ndarray((P, F), dtype=data.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=dst, src=data.ap(pattern=[[F, P], [1, F]], vector_offset=idx, indirect_dim=0))
    nisa.dma_copy(dst=out, src=dst)
    return out


def test_indirect_gather_matches_numpy():
    rng = np.random.default_rng(SEED)
    data = rng.standard_normal((50, 24)).astype(ml_dtypes.bfloat16)
    idx = rng.integers(0, 50, size=(37, 1)).astype(np.uint32)
    out, report = run(gather_rows, data, idx)
    np.testing.assert_array_equal(out, data[idx[:, 0]])
    assert report.hbm_read_bytes == 37 * 4 + 37 * 24 * 2


def test_indirect_scatter_into_returned_argument():
    @nki.jit
    def scatter(src_data, indices, output):
        P, F = src_data.shape
        src = nl.load(src_data)
        idx = nl.ndarray((P, 1), dtype=nl.uint32, buffer=nl.sbuf)
        nisa.dma_copy(dst=idx, src=indices)
        nisa.dma_copy(dst=output.ap(pattern=[[F, P], [1, F]], vector_offset=idx, indirect_dim=0), src=src)
        return output

    rng = np.random.default_rng(SEED)
    src = rng.standard_normal((5, 7)).astype(np.float32)
    idx = np.array([[3], [0], [9], [4], [1]], dtype=np.uint32)
    base = np.zeros((10, 7), dtype=np.float32)
    out, _ = run(scatter, src, idx, base)
    ref = base.copy()
    ref[idx[:, 0]] = src
    np.testing.assert_array_equal(out, ref)
    assert not base.any()  # the caller's array is not modified


def test_dma_compute_scatter_add():
    @nki.jit
    def scatter_add(acc, src_data, indices):
        out = nl.ndarray(acc.shape, dtype=acc.dtype, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=out, src=acc)
        P, F = src_data.shape
        src = nl.load(src_data)
        idx = nl.ndarray((P, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=idx, src=indices)
        rows = out.ap(pattern=[[F, P], [1, F]], vector_offset=idx, indirect_dim=0)
        nisa.dma_compute(dst=rows, srcs=[rows, src], reduce_op=nl.add)
        return out

    rng = np.random.default_rng(SEED)
    acc = rng.standard_normal((12, 9)).astype(np.float32)
    src = rng.standard_normal((4, 9)).astype(np.float32)
    idx = np.array([[2], [11], [0], [5]], dtype=np.int32)
    out, _ = run(scatter_add, acc, src, idx)
    ref = acc.copy()
    ref[idx[:, 0]] += src
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_paged_kv_gather_with_scalar_offset():
    """Decode attention reads one KV block per step: block id from the block table as a scalar offset."""

    @nki.jit
    def gather_blocks(cache, table):
        nb, bs, d = cache.shape
        n = table.shape[1]
        out = nl.ndarray((n * bs, d), dtype=cache.dtype, buffer=nl.shared_hbm)
        for j in range(n):
            bid = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
            nisa.dma_copy(dst=bid, src=table[0:1, j : j + 1])
            blk = nl.ndarray((bs, d), dtype=cache.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=blk, src=cache.ap([[d, bs], [1, d]], scalar_offset=bid, indirect_dim=0))
            nisa.dma_copy(dst=out[j * bs : (j + 1) * bs, :], src=blk)
        return out

    rng = np.random.default_rng(SEED)
    cache = rng.standard_normal((6, 16, 8)).astype(np.float32)
    table = np.array([[4, 0, 5]], dtype=np.int32)
    out, _ = run(gather_blocks, cache, table)
    np.testing.assert_array_equal(out, cache[[4, 0, 5]].reshape(-1, 8))


# --- causal mask with iota / affine_select, LNC2 grid, fp8, views ----------------------------------------------------
def test_affine_select_causal_mask_and_iota():
    @nki.jit
    def kern(scores):
        n = scores.shape[0]
        out = nl.ndarray((n, n), dtype=nl.float32, buffer=nl.shared_hbm)
        pos = nl.ndarray((n, n), dtype=nl.float32, buffer=nl.shared_hbm)
        s = nl.load(scores)
        m = nl.ndarray((n, n), dtype=nl.float32, buffer=nl.sbuf)
        # keep where row - col >= 0
        nisa.affine_select(
            dst=m,
            pattern=[[-1, n]],
            channel_multiplier=1,
            on_true_tile=s,
            on_false_value=-1e30,
            cmp_op=nl.greater_equal,
        )
        nl.store(out, m)
        it = nl.ndarray((n, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.iota(dst=it, pattern=[[1, n]], offset=10, channel_multiplier=100)
        nl.store(pos, it)
        return out, pos

    s = np.random.default_rng(SEED).standard_normal((9, 9)).astype(np.float32)
    (out, pos), _ = run(kern, s)
    np.testing.assert_array_equal(out, np.where(np.tril(np.ones((9, 9), bool)), s, np.float32(-1e30)))
    np.testing.assert_array_equal(pos, 10 + 100 * np.arange(9)[:, None] + np.arange(9)[None, :])


def test_lnc2_grid_programs_share_outputs():
    @nki.jit
    def kern(x):
        out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
        half = x.shape[0] // nl.num_programs()
        r0 = nl.program_id(0) * half
        t = nl.load(x[r0 : r0 + half, :])
        nl.store(out[r0 : r0 + half, :], nl.multiply(t, 2.0))
        return out

    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    out, report = run(kern[2], x)
    np.testing.assert_array_equal(out, 2 * x)
    assert report.num_programs == 2


def test_bf16_and_fp8_stores_round_to_nearest_even():
    @nki.jit
    def kern(x):
        a = nl.ndarray(x.shape, dtype=nl.bfloat16, buffer=nl.shared_hbm)
        b = nl.ndarray(x.shape, dtype=nl.float8_e4m3, buffer=nl.shared_hbm)
        t = nl.load(x)
        ta = nl.ndarray(x.shape, dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.tensor_copy(dst=ta, src=t)
        tb = nl.ndarray(x.shape, dtype=nl.float8_e4m3, buffer=nl.sbuf)
        nisa.activation(dst=tb, op=nl.copy, data=t)
        nl.store(a, ta)
        nl.store(b, tb)
        return a, b

    x = np.array([[1.00390625, 1.01171875, 3.3, -7.77]], dtype=np.float32)  # bf16 ties: to even
    (a, b), _ = run(kern, x)
    np.testing.assert_array_equal(a.astype(np.float32), x.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(a.astype(np.float32)[0, :2], [1.0, 1.015625])
    np.testing.assert_array_equal(b, x.astype(ml_dtypes.float8_e4m3))


def test_fresh_sbuf_reads_nan():
    @nki.jit
    def kern(x):
        out = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.shared_hbm)
        t = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=t[:, 0:2], src=x[:, 0:2])
        nl.store(out, t)
        return out

    out, _ = run(kern, np.ones((3, 4), np.float32))
    assert np.all(out[:, :2] == 1) and np.all(np.isnan(out[:, 2:]))


def test_tensor_views_reshape_permute_broadcast():
    @nki.jit
    def kern(x):
        P, A, B = x.shape
        out = nl.ndarray((P, B, A), dtype=x.dtype, buffer=nl.shared_hbm)
        t = nl.ndarray((P, A * B), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x.reshape((P, A * B)))
        o = nl.ndarray((P, B, A), dtype=x.dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=o, src=t.reshape((P, A, B)).permute((0, 2, 1)))
        col = nl.ndarray((P, 1), dtype=x.dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=col, src=t[:, 0:1])
        o2 = nl.ndarray((P, B, A), dtype=x.dtype, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=o2, data1=o, data2=col.broadcast(1, B * A).reshape_dim(1, (B, A)), op=nl.subtract)
        nisa.dma_copy(dst=out, src=o2)
        return out

    x = np.random.default_rng(SEED).standard_normal((5, 3, 4)).astype(np.float32)
    out, _ = run(kern, x)
    np.testing.assert_allclose(out, x.transpose(0, 2, 1) - x[:, :1, :1], rtol=1e-6)


def test_simulate_returns_outputs_only():
    x = np.random.default_rng(SEED).standard_normal((4, 16)).astype(np.float32)
    out = nki.simulate(softmax_rows)(x)
    np.testing.assert_allclose(out, _softmax_ref(x), rtol=1e-5)
