"""``nki.collectives`` in the emulator: all_reduce across ranks run concurrently (``run_ranks``), its rules from AWS's
API reference (aws-neuron-sdk ``nki/api/nki/collectives/__init__.py``) and its time from the intra-node collectives
note, checked against NumPy and the formula worked by hand."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import nki_emulator as emulator
from nki_emulator import collectives, targets

emulator.install()
import nki  # noqa: E402
import nki.collectives as ncc  # noqa: E402
import nki.isa as nisa  # noqa: E402
import nki.language as nl  # noqa: E402

BF16 = ml_dtypes.bfloat16


def _reduce_in_sbuf(groups, op=None, out_dtype=None):
    """A kernel: x [P, F] to SBUF, all_reduce over ``groups`` into a tile of ``out_dtype``, stored."""
    op = nl.add if op is None else op

    @nki.jit
    def kernel(x):
        dt = x.dtype if out_dtype is None else out_dtype
        out = nl.ndarray(x.shape, dtype=dt, buffer=nl.shared_hbm)
        t = nl.ndarray(x.shape, dtype=dt, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x)
        r = nl.ndarray(x.shape, dtype=dt, buffer=nl.sbuf)
        ncc.all_reduce(srcs=[t], dsts=[r], replica_group=ncc.ReplicaGroup(groups), op=op)
        nisa.dma_copy(dst=out, src=r)
        return out

    return kernel


def _inputs(n, shape=(128, 24), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def test_all_reduce_sums_over_four_ranks_in_fp32_rounded_once():
    xs = [x.astype(BF16) for x in _inputs(4)]
    results = emulator.run_ranks(_reduce_in_sbuf([[0, 1, 2, 3]]), [(x,) for x in xs])
    want = sum(x.astype(np.float32) for x in xs).astype(BF16)  # fp32 over the ranks in rank order, one rounding
    for out, _ in results:
        np.testing.assert_array_equal(out.astype(np.float32), want.astype(np.float32))


def test_sub_groups_reduce_separately_and_min_max():
    xs = _inputs(4, seed=1)
    results = emulator.run_ranks(_reduce_in_sbuf([[0, 2], [1, 3]], op=nl.maximum), [(x,) for x in xs])
    np.testing.assert_array_equal(results[0][0], np.maximum(xs[0], xs[2]))
    np.testing.assert_array_equal(results[3][0], np.maximum(xs[1], xs[3]))
    results = emulator.run_ranks(_reduce_in_sbuf([[0, 1]], op=nl.minimum), [(x,) for x in xs[:2]])
    np.testing.assert_array_equal(results[1][0], np.minimum(xs[0], xs[1]))


@nki.jit
def _coalesced_in_hbm(a, b):
    """Two HBM tensors reduced by one collective (coalesced: HBM only)."""
    ra = nl.ndarray(a.shape, dtype=a.dtype, buffer=nl.shared_hbm)
    rb = nl.ndarray(b.shape, dtype=b.dtype, buffer=nl.shared_hbm)
    ncc.all_reduce(srcs=[a, b], dsts=[ra, rb], replica_group=ncc.ReplicaGroup([[0, 1, 2]]), op=nl.add)
    return ra, rb


def test_coalesced_hbm_tensors():
    a_s, b_s = _inputs(3, (4, 64), seed=2), _inputs(3, (2, 8), seed=3)
    results = emulator.run_ranks(_coalesced_in_hbm, list(zip(a_s, b_s)))
    for (ra, rb), _ in results:
        np.testing.assert_allclose(ra, a_s[0] + a_s[1] + a_s[2], rtol=1e-6)
        np.testing.assert_allclose(rb, b_s[0] + b_s[1] + b_s[2], rtol=1e-6)


@nki.jit
def _per_program(x):
    """LNC=2: program p reduces row block p of x (its own data) and stores it."""
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    p = nl.program_id(0)
    t = nl.ndarray((64, x.shape[1]), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x[p * 64 : p * 64 + 64, :])
    r = nl.ndarray(t.shape, dtype=x.dtype, buffer=nl.sbuf)
    ncc.all_reduce(srcs=[t], dsts=[r], replica_group=ncc.ReplicaGroup([[0, 1]]), op=nl.add)
    nisa.dma_copy(dst=out[p * 64 : p * 64 + 64, :], src=r)
    return out


def test_each_program_of_an_lnc2_launch_reduces_with_the_same_program_of_the_other_ranks():
    xs = _inputs(2, seed=4)
    results = emulator.run_ranks(_per_program[2], [(x,) for x in xs])
    for out, report in results:
        np.testing.assert_allclose(out, xs[0] + xs[1], rtol=1e-6)
        assert report.ops["all_reduce"] == 2  # one per program


@nki.jit
def _which_rank(x):
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    t = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.memset(dst=t, value=float(ncc.rank_id()))
    nisa.dma_copy(dst=out, src=t)
    return out


def test_rank_id():
    results = emulator.run_ranks(_which_rank, [(np.zeros((1, 4), np.float32),)] * 3)
    assert [float(out[0, 0]) for out, _ in results] == [0.0, 1.0, 2.0]
    out, _ = emulator.run(_which_rank, np.zeros((1, 4), np.float32))
    assert float(out[0, 0]) == 0.0


def test_time_is_the_collective_model_worked_by_hand():
    """A [128, 24] fp32 tile (12 KiB): Mesh, 2 hops x 2 us, plus 2 x 2 (n - 1) / n x 12 KiB at one core's HBM
    bandwidth; over one rank the collective is free."""
    x = _inputs(1)[0]
    _, alone = emulator.run(_reduce_in_sbuf([[0]]), x)
    with emulator.solo_rank(4):
        out, solo = emulator.run(_reduce_in_sbuf([[0, 1, 2, 3]]), x)
    np.testing.assert_array_equal(out, x)  # the other ranks contribute the identity
    nbytes = 128 * 24 * 4
    by_hand = 2 * 2e-6 + 2 * (2 * 3 / 4 * nbytes) / targets.current().hbm_bytes_per_s_per_core
    assert collectives.all_reduce_seconds(nbytes, 4) == pytest.approx(by_hand)
    # the store after the collective waits for it: the whole kernel is later by exactly the collective's time
    assert solo.estimated_seconds - alone.estimated_seconds == pytest.approx(by_hand, rel=1e-6)
    results = emulator.run_ranks(_reduce_in_sbuf([[0, 1, 2, 3]]), [(x,)] * 4)
    assert results[0][1].estimated_seconds == pytest.approx(solo.estimated_seconds, rel=1e-9)
    assert collectives.all_reduce_latency(2 << 20, 4) == pytest.approx(4 * 2e-6)  # RDH above 1 MB: 2 log2(4) hops


def test_the_slowest_rank_sets_when_the_result_is_ready():
    @nki.jit
    def late_rank(x):
        out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
        t = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x)
        for _ in range(20 if ncc.rank_id() == 1 else 0):  # rank 1 works longer before its source is ready
            nisa.activation(dst=t, op=nl.exp, data=t, scale=0.0)
        r = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
        ncc.all_reduce(srcs=[t], dsts=[r], replica_group=ncc.ReplicaGroup([[0, 1]]), op=nl.add)
        nisa.dma_copy(dst=out, src=r)
        return out

    x = np.ones((128, 8), np.float32)
    (_, fast), (_, slow) = emulator.run_ranks(late_rank, [(x,), (x,)])
    assert fast.estimated_seconds == pytest.approx(slow.estimated_seconds, rel=1e-9)
    with emulator.solo_rank(2):  # rank 0 without a slower partner
        _, alone = emulator.run(late_rank, x)
    assert fast.estimated_seconds > alone.estimated_seconds + 20 * 64 / targets.current().scalar_hz


@pytest.mark.parametrize(
    "body, message",
    [
        ("mixed", "all must be in HBM or all in SBUF"),
        ("two_sbuf", "coalesced collectives"),
        ("multiply", "must be nl.add, nl.minimum or nl.maximum"),
        ("shape", "must have the same shape and dtype"),
        ("not_member", "rank 0 is in none of its sub-groups"),
        ("priority", r"NeuronCore-v4\+ only"),
        ("group_type", "must be an nki.collectives.ReplicaGroup"),
    ],
)
def test_bad_calls_name_the_problem(body, message):
    @nki.jit
    def kernel(x):
        out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
        t = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x)
        r = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
        group = ncc.ReplicaGroup([[0]])
        if body == "mixed":
            ncc.all_reduce(srcs=[x], dsts=[r], replica_group=group, op=nl.add)
        elif body == "two_sbuf":
            ncc.all_reduce(srcs=[t, t], dsts=[r, r], replica_group=group, op=nl.add)
        elif body == "multiply":
            ncc.all_reduce(srcs=[t], dsts=[r], replica_group=group, op=nl.multiply)
        elif body == "shape":
            ncc.all_reduce(srcs=[t], dsts=[r[:, 0:2]], replica_group=group, op=nl.add)
        elif body == "not_member":
            ncc.all_reduce(srcs=[t], dsts=[r], replica_group=ncc.ReplicaGroup([[1]]), op=nl.add)
        elif body == "priority":
            ncc.all_reduce(srcs=[t], dsts=[r], replica_group=group, op=nl.add, priority=0)
        else:
            ncc.all_reduce(srcs=[t], dsts=[r], replica_group=[[0]], op=nl.add)
        nisa.dma_copy(dst=out, src=r)
        return out

    with pytest.raises(emulator.NkiEmulatorError, match=message):
        emulator.run(kernel, np.ones((4, 8), np.float32))


def test_group_larger_than_the_run_and_overlapping_groups():
    with pytest.raises(emulator.NkiEmulatorError, match=r"rank 0 of 1 \(run the ranks with emulator.run_ranks"):
        emulator.run(_reduce_in_sbuf([[0, 1]]), np.ones((4, 8), np.float32))
    with pytest.raises(emulator.NkiEmulatorError, match="sub-groups overlap"):
        ncc.ReplicaGroup([[0, 1], [1, 2]])
    with pytest.raises(emulator.NkiEmulatorError, match="non-empty list"):
        ncc.ReplicaGroup([])


def test_ranks_that_disagree_or_never_arrive_fail_instead_of_hanging():
    x = np.ones((4, 8), np.float32)

    @nki.jit
    def disagree(x):
        out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
        t = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x)
        op = nl.add if ncc.rank_id() == 0 else nl.maximum
        ncc.all_reduce(srcs=[t], dsts=[t], replica_group=ncc.ReplicaGroup([[0, 1]]), op=op)
        nisa.dma_copy(dst=out, src=t)
        return out

    with pytest.raises(emulator.NkiEmulatorError, match="the ranks must agree"):
        emulator.run_ranks(disagree, [(x,), (x,)])

    @nki.jit
    def skips(x):
        out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
        t = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x)
        if ncc.rank_id() == 0:
            ncc.all_reduce(srcs=[t], dsts=[t], replica_group=ncc.ReplicaGroup([[0, 1]]), op=nl.add)
        nisa.dma_copy(dst=out, src=t)
        return out

    with pytest.raises(emulator.NkiEmulatorError, match="deadlock"):
        emulator.run_ranks(skips, [(x,), (x,)])


def test_collectives_the_emulator_lacks_say_so():
    with pytest.raises(emulator.NkiEmulatorError, match="all_gather: not implemented by the emulator"):
        ncc.all_gather(srcs=[], dsts=[], replica_group=None, collective_dim=0)
