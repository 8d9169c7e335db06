"""Rules fixed to match the documented compiler (issue 12): accumulate=None inference, address= placement and aliasing,
live-range SBUF/PSUM accounting, NKIObject classes, ordered nc_version, nki.isa.constants, nki.dtype, x4 dtypes.
Each accepted AWS-style pattern has a negative twin that must still be rejected."""

import dataclasses

import nki
import nki.isa as nisa
import nki.language as nl
import numpy as np
import pytest

from nki_emulator import NkiEmulatorError, run

SEED = 12
PSUM_BANK_BYTES = 2048  # tile_size.psum_bank_fmax_bytes


def _sb(shape, dtype=nl.float32, **kw):
    return nl.ndarray(shape, dtype=dtype, buffer=nl.sbuf, **kw)


def _ps(shape, dtype=nl.float32, **kw):
    return nl.ndarray(shape, dtype=dtype, buffer=nl.psum, **kw)


def _load(x):
    t = _sb(x.shape, x.dtype)
    nisa.dma_copy(dst=t, src=x)
    return t


def _store(t):
    out = nl.ndarray(t.shape, dtype=t.dtype, buffer=nl.shared_hbm)
    sb = t
    if t.buffer == nl.psum:
        sb = _sb(t.shape, t.dtype)
        nisa.tensor_copy(dst=sb, src=t)
    nisa.dma_copy(dst=out, src=sb)
    return out


# --- (a) accumulate=None after memset: first matmul write overwrites ------------------------------------------------
def test_nc_matmul_accumulate_none_after_memset_overwrites():
    rng = np.random.default_rng(SEED)
    a = rng.standard_normal((16, 4)).astype(np.float32)
    b = rng.standard_normal((16, 8)).astype(np.float32)

    def kern(a, b):
        dst = _ps((4, 8))
        nisa.memset(dst, 7.0)
        sa, sbt = _load(a), _load(b)
        nisa.nc_matmul(dst=dst, stationary=sa, moving=sbt)  # overwrites the memset values
        nisa.nc_matmul(dst=dst, stationary=sa, moving=sbt)  # then accumulates
        return _store(dst)

    out, _ = run(nki.jit(kern), a, b)
    np.testing.assert_allclose(out, 2 * a.T @ b, rtol=1e-5, atol=1e-5)


def test_nc_matmul_accumulate_none_after_readout_starts_a_new_group():
    """A PSUM tile reused after its result was copied out: the next matmul overwrites (nki-library 2.29 does so)."""
    rng = np.random.default_rng(SEED)
    a = rng.standard_normal((16, 4)).astype(np.float32)
    b = rng.standard_normal((16, 8)).astype(np.float32)

    def kern(a, b):
        dst = _ps((4, 8))
        sa, sbt = _load(a), _load(b)
        nisa.nc_matmul(dst=dst, stationary=sa, moving=sbt)
        nisa.tensor_copy(dst=_sb((4, 8)), src=dst)
        nisa.nc_matmul(dst=dst, stationary=sa, moving=sbt)
        return _store(dst)

    out, _ = run(nki.jit(kern), a, b)
    np.testing.assert_allclose(out, a.T @ b, rtol=1e-5, atol=1e-5)


def test_nkiobject_dataclass_with_unannotated_class_attributes():
    @dataclasses.dataclass
    class SectionLike(nl.NKIObject):
        section_idx = None
        offsets = []

    s = SectionLike(section_idx=3)
    assert s.section_idx == 3 and s.offsets == [] and SectionLike().offsets is not s.offsets


# --- (b) address= placement: aliasing, one charge per placement, overlaps ----------------------------------------
def test_ndarray_same_address_aliases_and_reads_the_data():
    x = np.arange(128 * 8, dtype=np.float32).reshape(128, 8)

    def kern(x):
        first = _sb((128, 8), address=(0, 4096))
        nisa.dma_copy(dst=first, src=x)
        second = _sb((128, 8), address=(0, 4096))  # a second handle on the same bytes
        return _store(second)

    out, _ = run(nki.jit(kern), x)
    np.testing.assert_array_equal(out, x)


def test_ndarray_circular_psum_buffers_charge_each_bank_once():
    """Flash-attention style: 16 PSUM handles over 4 addressed banks plus 4 compiler-placed tiles fit 8 banks."""

    def kern():
        keep = [_ps((128, 512)) for _ in range(4)]
        for t in keep:
            nisa.memset(t, 0.0)
        for i in range(16):
            p = _ps((128, 512), address=(0, (i % 4) * PSUM_BANK_BYTES))
            nisa.memset(p, float(i))
            nisa.tensor_copy(dst=_sb((128, 512)), src=p)
        for t in keep:
            nisa.tensor_copy(dst=_sb((128, 512)), src=t)

    _, rep = run(nki.jit(kern))
    assert rep.peak_psum_banks == 8


def test_ndarray_overlapping_placements_share_bytes():
    """Different placements that overlap alias byte for byte, as on hardware (no allocation of their own)."""

    def kern():
        a = _sb((128, 64), address=(0, 0))
        b = _sb((128, 64), address=(0, 128))  # b's first 32 floats are a's last 32
        nisa.memset(a, 1.0)
        nisa.memset(b, 2.0)
        return _store(a)

    out, _ = run(nki.jit(kern))
    np.testing.assert_array_equal(out[:, :32], 1.0)
    np.testing.assert_array_equal(out[:, 32:], 2.0)


def test_ndarray_rejects_misaligned_placement():
    with pytest.raises(NkiEmulatorError, match="address byte offset=2; must be a multiple of the 4-byte element size"):
        run(nki.jit(lambda: _sb((128, 4), address=(0, 2))))


def test_ndarray_rejects_psum_placement_across_a_bank():
    with pytest.raises(NkiEmulatorError, match="must lie within one 2048 B bank"):
        run(nki.jit(lambda: _ps((128, 512), address=(0, 1024))))


def test_ndarray_rejects_malformed_address():
    with pytest.raises(NkiEmulatorError, match=r"address=5; must be \(partition_offset, free_offset\)"):
        run(nki.jit(lambda: _sb((128, 4), address=5)))


# --- (c) live-range accounting --------------------------------------------------------------------------------------
def test_loop_allocated_tiles_are_not_charged_twice():
    """Two 100 KiB tiles per iteration; the previous iteration's tiles are dead (bound to names, never used again)."""
    n = 100 * 1024 // 4

    def kern():
        for _ in range(3):
            a = _sb((128, n))
            nisa.memset(a, 1.0)
            b = _sb((128, n))
            nisa.tensor_copy(dst=b, src=a)

    _, rep = run(nki.jit(kern))
    assert rep.peak_sbuf_bytes_per_partition == 2 * n * 4


def test_small_partition_tiles_are_charged_on_their_quadrants():
    """Four [32, 200 KiB] tiles live together fit: each occupies one quadrant, not all 128 partitions."""
    n = 200 * 1024 // 4

    def kern():
        tiles = [_sb((32, n)) for _ in range(4)]
        for t in tiles:
            nisa.memset(t, 0.0)
        for t in tiles:
            nisa.tensor_copy(dst=t, src=t)

    _, rep = run(nki.jit(kern))
    assert rep.peak_sbuf_bytes_per_partition == n * 4


def test_small_partition_tiles_still_rejected_when_quadrants_overflow():
    n = 200 * 1024 // 4

    def kern():
        tiles = [_sb((32, n)) for _ in range(5)]
        for t in tiles:
            nisa.memset(t, 0.0)
        for t in tiles:
            nisa.tensor_copy(dst=t, src=t)

    with pytest.raises(NkiEmulatorError, match="SBUF bytes per partition=.*exceeds the usable"):
        run(nki.jit(kern))


# --- (d) NKIObject, nc_version, namespaces --------------------------------------------------------------------------
def test_nkiobject_dataclass_with_fields_without_values():
    @dataclasses.dataclass
    class Config(nl.NKIObject):
        tile: int = 128
        dtype: object  # no value after a defaulted field: the compiler gives it None

    c = Config(dtype=nl.bfloat16)
    assert (c.tile, c.dtype) == (128, nl.bfloat16)
    assert Config().dtype is None


def test_nkiobject_plain_class_keyword_construction():
    class Params(nl.NKIObject):
        a: int
        b: float = 0.5

        def __post_init__(self):
            self.c = 2 * self.b

    p = Params(3, b=1.5)
    assert (p.a, p.b, p.c) == (3, 1.5, 3.0)
    with pytest.raises(TypeError, match="unexpected or repeated field 'z'"):
        Params(z=1)


def test_nc_version_is_ordered():
    assert nisa.get_nc_version() >= nisa.nc_version.gen3
    assert nisa.nc_version.gen2 < nisa.nc_version.gen4
    assert not nisa.get_nc_version() >= nisa.nc_version.gen4
    with pytest.raises(TypeError):
        nisa.nc_version.gen3 < 3  # noqa: B015 - only versions compare


def test_isa_constants_and_nki_dtype():
    from nki.isa.constants import dge_mode, oob_mode

    assert oob_mode.skip is nisa.oob_mode.skip and dge_mode.swdge is nisa.dge_mode.swdge
    assert isinstance(nl.bfloat16, nki.dtype)


def test_packed_x4_dtypes_allocate_copy_and_zero_fill():
    def kern():
        t = _sb((128, 16), nl.float8_e4m3fn_x4)
        nisa.memset(t, 0)
        u = _sb((128, 16), nl.float8_e4m3fn_x4)
        nisa.tensor_copy(dst=u, src=t)
        assert t.dtype.itemsize == 4 and nl.float4_e2m1fn_x4.itemsize == 2 and nl.float8_e5m2_x4.itemsize == 4

    run(nki.jit(kern))


def test_memset_rejects_non_zero_on_packed_x4():
    def kern():
        nisa.memset(_sb((128, 16), nl.float8_e5m2_x4), 1)

    with pytest.raises(NkiEmulatorError, match="x4 packed types take value=0 only"):
        run(nki.jit(kern))


# --- views: zero-stride destinations, access patterns checked at use ----------------------------------------------
def test_zero_stride_destination_keeps_the_last_write():
    """nki-library's qkv_cte writes a scratch activation through `.ap([[1, n], [0, H]])`: one element per partition."""
    x = np.arange(4 * 8, dtype=np.float32).reshape(4, 8)

    def kern(x):
        scratch = _sb((4, 1))
        nisa.activation(dst=scratch.ap([[1, 4], [0, 8]]), op=nl.copy, data=_load(x))
        return _store(scratch)

    out, _ = run(nki.jit(kern), x)
    np.testing.assert_array_equal(out, x[:, -1:])


def test_access_pattern_outside_allocation_is_fine_until_used():
    def kern(x):
        t = _load(x)
        _ = t.ap([[8, 4], [2, 8]], offset=2)  # reaches past the tile, never used: accepted
        nisa.tensor_copy(dst=_sb((4, 4)), src=t.ap([[8, 4], [2, 4]], offset=1))

    run(nki.jit(kern), np.ones((4, 8), np.float32))


def test_access_pattern_with_dtype_counts_offset_in_the_new_dtype():
    """`.ap(pattern, offset, dtype=)`: pattern and offset in elements of the new dtype (the NkiTensor.ap doc example;
    nki-library's topk_reduce reads int32 indices packed at the end of bf16 rows this way)."""
    x = np.arange(4 * 8, dtype=np.int16).reshape(4, 8)

    def kern(x):
        t = _sb((4, 1), nl.int32)
        nisa.dma_copy(dst=t, src=x.ap([[4, 4], [1, 1]], offset=3, dtype=nl.int32))
        return _store(t)

    out, _ = run(nki.jit(kern), x)
    np.testing.assert_array_equal(out[:, 0], x[:, 6:8].copy().view(np.int32)[:, 0])


def test_on_chip_selection_stays_two_dimensional():
    """NkiTensor.__getitem__ doc: on-chip results are always at least 2-D (nki-library's attention_cte relies on it)."""

    def kern():
        t = _sb((128, 64))
        assert t[:, 0].shape == (128, 1) and t[3, 5].shape == (1, 1) and t[:, 0][:64, :1].shape == (64, 1)

    run(nki.jit(kern))


def test_access_pattern_on_a_placed_tile_counts_its_own_rows():
    """`.ap` partition strides count the allocation's free size, also for address= tiles (in an arena row)."""
    x = np.arange(4 * 8, dtype=np.float32).reshape(4, 8)

    def kern(x):
        t = _sb((4, 8), address=(0, 512))
        nisa.dma_copy(dst=t.ap([[8, 4], [1, 8]]), src=x)
        assert t.get_pattern() == [[8, 4], [1, 8]]
        u = _sb((3, 4))
        nisa.tensor_copy(dst=u, src=t.ap([[8, 3], [2, 4]], offset=9))  # rows 1..3, odd columns
        return _store(u)

    out, _ = run(nki.jit(kern), x)
    np.testing.assert_array_equal(out, x[1:, 1::2])


# --- kernel calls: nested nki.jit, in-place arguments ----------------------------------------------------------------
@nki.jit
def _inner_copy(x):
    t = _load(x)
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=t)
    return out


def test_nested_jit_kernel_is_inlined_into_the_callers_program():
    def outer(x):
        assert nl.num_programs() == 2  # the inner kernel runs in this program, not in a new launch of 1
        return _inner_copy(x)

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    out, rep = run(nki.jit(outer)[2], x)
    np.testing.assert_array_equal(out, x)
    assert rep.num_programs == 2


def test_mutable_tensor_argument_may_be_written_in_place():
    import nki.typing as nt

    def writes(x, scratch: nt.mutable_tensor):
        nisa.dma_copy(dst=scratch, src=_load(x))
        return _inner_copy(x)

    def writes_undeclared(x, scratch):
        nisa.dma_copy(dst=scratch, src=_load(x))
        return _inner_copy(x)

    x = np.ones((2, 4), np.float32)
    run(nki.jit(writes), x, np.zeros((2, 4), np.float32))
    with pytest.raises(NkiEmulatorError, match=r"input arg1\[2, 4\] was written; kernel arguments are read-only"):
        run(nki.jit(writes_undeclared), x, np.zeros((2, 4), np.float32))
