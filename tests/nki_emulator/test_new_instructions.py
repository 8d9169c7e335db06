"""Instructions added for issue 12, each against a NumPy reference written from its isa docstring (or AWS's NumPy
reference in aws-neuron-sdk:nki/test/), and each with a rejected misuse naming instruction, argument and rule."""

import threading

import nki
import nki.isa as nisa
import nki.language as nl
import numpy as np
import pytest

from nki_emulator import NkiEmulatorError, run

SEED = 1212


def _load(x, dtype=None):
    t = nl.ndarray(x.shape, dtype=x.dtype if dtype == None else dtype, buffer=nl.sbuf)  # noqa: E711 - no `is` (NKI 0.3)
    nisa.dma_copy(dst=t, src=x)
    return t


def _out(t):
    o = nl.ndarray(t.shape, dtype=t.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=o, src=t)
    return o


def _new(shape, dtype=nl.float32):
    return nl.ndarray(shape, dtype=dtype, buffer=nl.sbuf)


@pytest.fixture
def rng():
    return np.random.default_rng(SEED)


def test_tensor_copy_predicated_matches_numpy(rng):
    src = rng.standard_normal((7, 19)).astype(np.float32)
    old = rng.standard_normal((7, 19)).astype(np.float32)
    pred = (rng.random((7, 19)) > 0.5).astype(np.uint8)

    def kern(src, old, pred):
        d = _load(old)
        nisa.tensor_copy_predicated(dst=d, src=_load(src), predicate=_load(pred))
        e = _load(old)
        nisa.tensor_copy_predicated(dst=e, src=-1.0, predicate=_load(pred), reverse_pred=True)
        return _out(d), _out(e)

    (d, e), _ = run(nki.jit(kern), src, old, pred)
    np.testing.assert_array_equal(d, np.where(pred != 0, src, old))
    np.testing.assert_array_equal(e, np.where(pred == 0, np.float32(-1.0), old))


def test_tensor_copy_predicated_rejects_float_predicate():
    def kern():
        t = _new((4, 4))
        nisa.memset(t, 0.0)
        nisa.tensor_copy_predicated(dst=_new((4, 4)), src=t, predicate=t)

    with pytest.raises(NkiEmulatorError, match="nisa.tensor_copy_predicated: predicate dtype=float32; must be uint8"):
        run(nki.jit(kern))


def test_tensor_tensor_scan_matches_numpy(rng):
    a = rng.standard_normal((5, 33)).astype(np.float32)
    b = rng.standard_normal((5, 33)).astype(np.float32)
    init = rng.standard_normal((5, 1)).astype(np.float32)

    def kern(a, b, init):
        d = _new(a.shape)
        nisa.tensor_tensor_scan(dst=d, data0=_load(a), data1=_load(b), initial=_load(init), op0=nl.multiply, op1=nl.add)
        return _out(d)

    out, _ = run(nki.jit(kern), a, b, init)
    ref = np.empty_like(a)
    prev = init[:, 0]
    for i in range(a.shape[1]):  # the docstring's loop: result[:, i] = op1(op0(data0[:, i], result[:, i-1]), data1)
        prev = a[:, i] * prev + b[:, i]
        ref[:, i] = prev
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_tensor_tensor_scan_rejects_activation_operator():
    def kern():
        t = _new((4, 4))
        nisa.memset(t, 1.0)
        nisa.tensor_tensor_scan(dst=_new((4, 4)), data0=t, data1=t, initial=0.0, op0=nl.exp, op1=nl.add)

    with pytest.raises(NkiEmulatorError, match="nisa.tensor_tensor_scan: op0=nl.exp; not a supported operator"):
        run(nki.jit(kern))


def test_nc_stream_shuffle_matches_numpy(rng):
    x = rng.standard_normal((64, 6)).astype(np.float32)
    mask = [(i * 7) % 32 for i in range(32)]
    mask[3] = 255

    def kern(x):
        d = _new((64, 6))
        nisa.memset(d, 0.0)
        nisa.nc_stream_shuffle(dst=d, src=_load(x), shuffle_mask=mask)
        return _out(d)

    out, _ = run(nki.jit(kern), x)
    ref = np.zeros_like(x)
    for q in (0, 32):
        for i, m in enumerate(mask):
            if m != 255:
                ref[q + i] = x[q + m]
    np.testing.assert_array_equal(out, ref)


def test_nc_stream_shuffle_rejects_bad_start_partition():
    def kern():
        t = _new((128, 4))
        nisa.memset(t, 0.0)
        nisa.nc_stream_shuffle(dst=t[0:64, :], src=t[32:96, :], shuffle_mask=list(range(32)))

    with pytest.raises(NkiEmulatorError, match="src start partition=32 with 64 active partitions; must be one of"):
        run(nki.jit(kern))


def test_local_gather_matches_aws_numpy_reference(rng):
    """aws-neuron-sdk:nki/test/test_nki_isa_local_gather.py's NumPy semantics, on a smaller tile."""
    src = (rng.random((32, 64, 4)) * 100).astype(np.float32)
    per_core = rng.integers(0, 64, size=(16, 2)).astype(np.uint16)
    index = np.tile(per_core, (2, 1))
    n_elem, n_valid = 4, 20

    def kern(src, index):
        d = _new((32, n_valid * n_elem))
        s = _new((32, 64 * 4))
        nisa.dma_copy(dst=s, src=src.reshape((32, 256)))
        nisa.local_gather(d, s, _load(index), num_elem_per_idx=n_elem, num_valid_indices=n_valid)
        return _out(d)

    out, _ = run(nki.jit(kern), src, (index * n_elem).astype(np.uint16))
    ref = np.empty((32, n_valid, n_elem), np.float32)
    for c in range(2):
        sl = slice(16 * c, 16 * (c + 1))
        ids = index[sl].flatten(order="F")[:n_valid]
        ref[sl] = np.take(src[sl], ids, axis=1)
    np.testing.assert_array_equal(out, ref.reshape(32, -1))


def test_local_gather_rejects_partitions_not_multiple_of_16():
    def kern():
        s = _new((8, 4))
        nisa.memset(s, 0.0)
        i = _new((8, 1), nl.uint16)
        nisa.memset(i, 0)
        nisa.local_gather(_new((8, 4)), s, i)

    with pytest.raises(NkiEmulatorError, match="nisa.local_gather: src_buffer partitions=8.*multiple of 16"):
        run(nki.jit(kern))


def test_nc_n_gather_matches_numpy(rng):
    data = rng.standard_normal((9, 3, 5)).astype(np.float32)
    idx = rng.integers(0, 15, size=(9, 11)).astype(np.uint32)

    def kern(data, idx):
        d = _new((9, 11))
        nisa.nc_n_gather(dst=d, data=_load(data), indices=_load(idx))
        return _out(d)

    out, _ = run(nki.jit(kern), data, idx)
    np.testing.assert_array_equal(out, np.take_along_axis(data.reshape(9, 15), idx.astype(np.int64), axis=1))


def test_nc_n_gather_rejects_out_of_range_index():
    def kern():
        d = _new((2, 4))
        nisa.memset(d, 0.0)
        i = _new((2, 2), nl.uint32)
        nisa.memset(i, 4)
        nisa.nc_n_gather(dst=_new((2, 2)), data=d, indices=i)

    with pytest.raises(NkiEmulatorError, match=r"nisa.nc_n_gather: indices max=4; must be in \[0, 4\)"):
        run(nki.jit(kern))


def test_bn_stats_bn_aggr_match_numpy_mean_var(rng):
    x = (rng.random((128, 1024)) * 100).astype(np.float32)

    def kern(x):
        xs = _load(x)
        stats = _new((128, 12))
        for i in range(2):
            nisa.bn_stats(dst=stats[:, 6 * i : 6 * i + 6], data=xs[:, 512 * i : 512 * (i + 1)])
        mv = _new((128, 2))
        nisa.bn_aggr(dst=mv, data=stats)
        return _out(mv)

    out, _ = run(nki.jit(kern), x)
    np.testing.assert_allclose(out[:, 0], x.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(out[:, 1], x.var(axis=1), rtol=1e-4)


def test_bn_stats_rejects_more_than_512_elements():
    def kern():
        x = _new((4, 513))
        nisa.memset(x, 0.0)
        nisa.bn_stats(dst=_new((4, 6)), data=x)

    with pytest.raises(NkiEmulatorError, match="nisa.bn_stats: data\\[4, 513\\] has 513 elements per partition"):
        run(nki.jit(kern))


def test_range_select_matches_doc_numpy(rng):
    x = rng.standard_normal((6, 40)).astype(np.float32)
    lo = rng.integers(0, 20, size=(6, 1)).astype(np.float32)
    hi = lo + rng.integers(1, 20, size=(6, 1)).astype(np.float32)

    def kern(x, lo, hi):
        d, mx = _new(x.shape), _new((6, 1))
        nisa.range_select(
            dst=d,
            on_true_tile=_load(x),
            comp_op0=nl.greater_equal,
            comp_op1=nl.less,
            bound0=_load(lo),
            bound1=_load(hi),
            reduce_res=mx,
            range_start=3,
        )
        return _out(d), _out(mx)

    (d, mx), _ = run(nki.jit(kern), x, lo, hi)
    idx = 3 + np.arange(40, dtype=np.float32)[None, :]
    ref = np.where((idx >= lo) & (idx < hi), x, np.finfo(np.float32).min)
    np.testing.assert_array_equal(d, ref)
    np.testing.assert_array_equal(mx, ref.max(axis=1, keepdims=True))


def test_range_select_rejects_other_fill_value():
    def kern():
        x, b = _new((2, 4)), _new((2, 1))
        nisa.memset(x, 0.0)
        nisa.memset(b, 1.0)
        nisa.range_select(_new((2, 4)), x, nl.less, nl.less, b, b, on_false_value=-1e9)

    with pytest.raises(NkiEmulatorError, match="nisa.range_select: on_false_value=-1000000000.0; must be FP32_MIN"):
        run(nki.jit(kern))


def test_nonzero_with_count_matches_doc_example():
    x = np.zeros((32, 8), np.float32)
    x[0] = [0, 1, 1, 0, 0, 1, 0, 0]  # the docstring's example row
    x[16, 7] = 2.0

    def kern(x):
        d = _new((32, 9), nl.int32)
        nisa.memset(d, 5)
        nisa.nonzero_with_count(dst=d, src=_load(x), index_offset=16, padding_val=-1)
        return _out(d)

    out, _ = run(nki.jit(kern), x)
    np.testing.assert_array_equal(out[0], [17, 18, 21, -1, -1, -1, -1, -1, 3])
    np.testing.assert_array_equal(out[16], [23, -1, -1, -1, -1, -1, -1, -1, 1])
    assert (out[1] == 5).all()  # only partitions 0, 16, ... are written


def test_nonzero_with_count_rejects_wrong_dst_width():
    def kern():
        x = _new((16, 8))
        nisa.memset(x, 0.0)
        nisa.nonzero_with_count(dst=_new((16, 8), nl.int32), src=x)

    with pytest.raises(NkiEmulatorError, match="must have src's 8 elements \\+ 1 per partition"):
        run(nki.jit(kern))


# --- LNC=2: concurrent programs, core_barrier, sendrecv -------------------------------------------------------------
def test_lnc2_programs_run_concurrently_with_core_barrier(rng):
    """Each core writes half of a shared tensor, waits at the barrier, then reads the other core's half."""
    x = rng.standard_normal((2, 8)).astype(np.float32)

    def kern(x):
        pid = nl.program_id(0)
        shared = nl.ndarray((2, 8), dtype=nl.float32, buffer=nl.shared_hbm)
        out = nl.ndarray((2, 8), dtype=nl.float32, buffer=nl.shared_hbm)
        mine = _new((1, 8))
        nisa.dma_copy(dst=mine, src=x[pid : pid + 1, :])
        nisa.tensor_scalar(dst=mine, data=mine, op0=nl.multiply, operand0=2.0)
        nisa.dma_copy(dst=shared[pid : pid + 1, :], src=mine)
        nisa.core_barrier(data=shared, cores=(0, 1))
        other = _new((1, 8))
        nisa.dma_copy(dst=other, src=shared[1 - pid : 2 - pid, :])
        nisa.dma_copy(dst=out[pid : pid + 1, :], src=other)
        return out

    out, rep = run(nki.jit(kern)[2], x)
    np.testing.assert_array_equal(out, 2 * x[::-1])
    assert rep.num_programs == 2


def test_lnc2_sendrecv_exchanges_tiles(rng):
    x = rng.standard_normal((2, 4, 16)).astype(np.float32)

    def kern(x):
        pid = nl.program_id(0)
        out = nl.ndarray((2, 4, 16), dtype=nl.float32, buffer=nl.shared_hbm)
        send, recv = _new((4, 16)), _new((4, 16))
        nisa.dma_copy(dst=send, src=x[pid])
        nisa.sendrecv(src=send, dst=recv, send_to_rank=1 - pid, recv_from_rank=1 - pid, pipe_id=0)
        nisa.dma_copy(dst=out[pid], src=recv)
        return out

    out, _ = run(nki.jit(kern)[2], x)
    np.testing.assert_array_equal(out, x[::-1])


def test_core_barrier_rejects_lnc1():
    def kern():
        t = nl.ndarray((1, 1), dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.core_barrier(data=t, cores=(0, 1))

    with pytest.raises(NkiEmulatorError, match="nisa.core_barrier: num_programs=1; only allowed with LNC=2"):
        run(nki.jit(kern))


def test_lnc2_partner_failure_does_not_hang():
    def kern():
        t = nl.ndarray((1, 1), dtype=nl.float32, buffer=nl.shared_hbm)
        if nl.program_id(0) == 1:
            nisa.memset(_new((1, 4)), 0.0, engine=nisa.gpsimd_engine)
            _new((129, 1))  # program 1 fails before the barrier
        nisa.core_barrier(data=t, cores=(0, 1))

    with pytest.raises(NkiEmulatorError, match="partition dim=129; exceeds pmax=128"):
        run(nki.jit(kern)[2])
    assert threading.active_count() < 10


def test_sendrecv_rejects_gpsimd_dma_over_size_limit():
    def kern():
        t = _new((2, 257), nl.float32)
        nisa.memset(t, 0.0)
        pid = nl.program_id(0)
        nisa.sendrecv(t, _new((2, 257)), 1 - pid, 1 - pid, 0, dma_engine=nisa.dma_engine.gpsimd_dma)

    with pytest.raises(NkiEmulatorError, match="1028 bytes per partition with dma_engine=gpsimd_dma; at most 1024"):
        run(nki.jit(kern)[2])


def test_core_barrier_rejects_other_cores_and_psum_data():
    def bad_cores():
        t = nl.ndarray((1, 1), dtype=nl.float32, buffer=nl.shared_hbm)
        nisa.core_barrier(data=t, cores=(0, 2))

    def psum_data():
        nisa.core_barrier(data=nl.ndarray((1, 1), dtype=nl.float32, buffer=nl.psum), cores=(0, 1))

    with pytest.raises(NkiEmulatorError, match=r"nisa.core_barrier: cores=\(0, 2\); only \(0, 1\) is supported"):
        run(nki.jit(bad_cores)[2])
    with pytest.raises(NkiEmulatorError, match="nisa.core_barrier: data=.*@psum; must be in shared HBM"):
        run(nki.jit(psum_data)[2])


def test_core_barrier_reached_by_one_program_only_is_a_deadlock():
    def kern():
        t = nl.ndarray((1, 1), dtype=nl.float32, buffer=nl.shared_hbm)
        if nl.program_id(0) == 0:
            nisa.core_barrier(data=t, cores=(0, 1))

    with pytest.raises(NkiEmulatorError, match="a partner program finished without reaching it; .* \\(deadlock\\)"):
        run(nki.jit(kern)[2])
