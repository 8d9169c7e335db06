"""Every strict rule of the emulator rejects its violation with an NkiEmulatorError naming the limit."""

import gc

import nki
import nki.isa as nisa
import nki.language as nl
import numpy as np
import pytest
from vllm_nki_moe.kernels.limits import SBUF_PARTITION_BYTES

from nki_emulator import NkiEmulatorError, run

SEED = 7


def _sb(shape, dtype=nl.float32):
    return nl.ndarray(shape, dtype=dtype, buffer=nl.sbuf)


def _ps(shape, dtype=nl.float32):
    return nl.ndarray(shape, dtype=dtype, buffer=nl.psum)


def _filled(shape, dtype=nl.float32, value=1.0):
    t = _sb(shape, dtype)
    nisa.memset(t, value)
    return t


def _raises(match, fn, *args):
    with pytest.raises(NkiEmulatorError, match=match):
        run(nki.jit(fn), *args)


# --- allocation ------------------------------------------------------------------------------------------------------
def test_ndarray_rejects_partition_dim_over_128_on_sbuf():
    _raises("exceeds pmax=128", lambda: _sb((129, 4)))


def test_ndarray_rejects_partition_dim_over_128_on_psum():
    _raises("exceeds pmax=128", lambda: _ps((129, 4)))


def test_ndarray_rejects_psum_tile_over_one_bank():
    _raises("exceeds one 2048 B bank", lambda: _ps((128, 513)))


def test_ndarray_rejects_more_than_8_psum_banks_live():
    def kern():
        tiles = [_ps((128, 512)) for _ in range(9)]
        for t in tiles:  # all written, then all read: nine banks live at once
            nisa.memset(t, 0.0)
        for t in tiles:
            nisa.tensor_copy(dst=_sb((128, 512)), src=t)

    _raises("live PSUM banks=9", kern)


def test_ndarray_rejects_sbuf_over_capacity():
    def kern():
        a = _sb((128, SBUF_PARTITION_BYTES // 4 - 8))
        b = _sb((128, 16))
        nisa.memset(a, 0.0)
        nisa.memset(b, 0.0)
        nisa.tensor_copy(dst=a[:, 0:16], src=b)  # a and b live together

    _raises(f"exceeds the usable {SBUF_PARTITION_BYTES} B", kern)


def test_ndarray_rejects_single_tile_over_sbuf_partition():
    _raises(f"exceeds the usable {SBUF_PARTITION_BYTES} B", lambda: _sb((1, SBUF_PARTITION_BYTES // 4 + 1)))


def test_ndarray_frees_dead_tiles_so_loops_do_not_leak():
    def kern():
        for _ in range(50):
            t = _sb((128, 16 * 1024))  # 64 KiB per partition each, 3.2 MiB in total
            p = _ps((128, 512))
            del t, p
        gc.collect()

    run(nki.jit(kern))


def test_ndarray_rejects_string_buffer():
    _raises("string buffer names", lambda: nl.ndarray((4, 4), dtype=nl.float32, buffer="sbuf"))


# --- DMA ---------------------------------------------------------------------------------------------------------
def test_dma_copy_rejects_psum_source():
    def kern(x):
        p = _ps((4, 4))
        nisa.dma_copy(dst=_sb((4, 4)), src=p)

    _raises("DMA cannot read or write PSUM", kern, np.zeros((4, 4), np.float32))


def test_dma_copy_rejects_psum_destination():
    _raises(
        "DMA cannot read or write PSUM", lambda x: nisa.dma_copy(dst=_ps((4, 4)), src=x), np.zeros((4, 4), np.float32)
    )


def test_dma_copy_rejects_element_count_mismatch():
    _raises("counts must match", lambda x: nisa.dma_copy(dst=_sb((4, 5)), src=x), np.zeros((4, 4), np.float32))


def test_dma_copy_rejects_out_of_bounds_indirect_index():
    def kern(data, indices):
        idx = _sb((2, 1), nl.int32)
        nisa.dma_copy(dst=idx, src=indices)
        nisa.dma_copy(dst=_sb((2, 3)), src=data.ap([[3, 2], [1, 3]], vector_offset=idx, indirect_dim=0))

    _raises("out of bounds", kern, np.zeros((4, 3), np.float32), np.array([[1], [4]], np.int32))


def test_ap_rejects_pattern_outside_allocation():
    def kern(x):
        view = x.ap([[4, 5], [1, 4]])  # built without complaint (kernels build views they then skip) ...
        nisa.dma_copy(dst=_sb((5, 4)), src=view)  # ... rejected when accessed

    _raises("fall outside the allocation", kern, np.zeros((4, 4), np.float32))


def test_slice_rejects_out_of_range_instead_of_clamping():
    _raises("no clamping", lambda x: x[0:5, :], np.zeros((4, 4), np.float32))


# --- kernel boundary -------------------------------------------------------------------------------------------------
def test_kernel_rejects_output_not_in_shared_hbm():
    def kern(x):
        t = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.hbm)
        nisa.dma_copy(dst=t, src=x)
        return t

    _raises("must be allocated in nl.shared_hbm", kern, np.zeros((4, 4), np.float32))


def test_kernel_rejects_sbuf_output():
    def kern(x):
        t = _sb(x.shape)
        nisa.dma_copy(dst=t, src=x)
        return t

    _raises("must be allocated in nl.shared_hbm", kern, np.zeros((4, 4), np.float32))


def test_kernel_rejects_write_to_input_not_returned():
    def kern(x):
        out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
        nisa.dma_copy(dst=x, src=_filled(x.shape))
        return out

    _raises("kernel arguments are read-only", kern, np.zeros((4, 4), np.float32))


# --- nc_matmul ------------------------------------------------------------------------------------------------------
def _mm(
    dst_shape,
    st_shape,
    mv_shape,
    dst_dtype=nl.float32,
    st_dtype=nl.bfloat16,
    mv_dtype=nl.bfloat16,
    dst_buf=nl.psum,
    st_buf=nl.sbuf,
    **kw,
):
    def kern():
        dst = nl.ndarray(dst_shape, dtype=dst_dtype, buffer=dst_buf)
        st = _filled(st_shape, st_dtype) if st_buf == nl.sbuf else nl.ndarray(st_shape, st_dtype, buffer=st_buf)
        mv = _filled(mv_shape, mv_dtype)
        nisa.nc_matmul(dst=dst, stationary=st, moving=mv, **kw)

    return kern


def test_nc_matmul_rejects_stationary_free_over_128():
    _raises("gemm_stationary_fmax=128", _mm((128, 4), (128, 129), (128, 4)))


def test_nc_matmul_rejects_moving_free_over_512():
    _raises("exceeds one 2048 B bank", _mm((128, 513), (128, 128), (128, 513)))
    _raises("gemm_moving_fmax=512", _mm((128, 512), (128, 128), (128, 64, 9)))


def test_nc_matmul_rejects_contraction_mismatch():
    _raises("contraction", _mm((4, 8), (64, 4), (32, 8)))


def test_nc_matmul_rejects_input_not_in_sbuf():
    _raises("inputs must be in SBUF", _mm((4, 8), (16, 4), (16, 8), st_buf=nl.psum))


def test_nc_matmul_rejects_output_not_in_psum():
    _raises("must be a PSUM tile", _mm((4, 8), (16, 4), (16, 8), dst_buf=nl.sbuf))


def test_nc_matmul_rejects_non_fp32_output():
    _raises("must be float32", _mm((4, 8), (16, 4), (16, 8), dst_dtype=nl.bfloat16))


def test_nc_matmul_rejects_fp32_mixed_with_bf16():
    _raises("fp32 cannot mix", _mm((4, 8), (16, 4), (16, 8), st_dtype=nl.float32))


def test_nc_matmul_rejects_output_shape_mismatch():
    _raises("must be \\[M=4, N=8\\]", _mm((4, 7), (16, 4), (16, 8)))


def test_nc_matmul_rejects_accumulate_true_on_fresh_psum():
    _raises("accumulate=True onto PSUM not initialised", _mm((4, 8), (16, 4), (16, 8), accumulate=True))


def test_nc_matmul_rejects_accumulate_true_onto_memset_psum():
    def kern():
        dst = _ps((4, 8))
        nisa.memset(dst, 0.0)
        a, b = _filled((16, 4), nl.bfloat16), _filled((16, 8), nl.bfloat16)
        nisa.nc_matmul(dst=dst, stationary=a, moving=b, accumulate=True)

    _raises("accumulate=True onto PSUM not initialised by a matmul", kern)


# --- other instructions -----------------------------------------------------------------------------------------------
def test_activation_rejects_op_not_in_table():
    _raises(
        "not in the activation function table",
        lambda: nisa.activation(dst=_sb((4, 4)), op=nl.maximum, data=_filled((4, 4))),
    )


def test_activation_rejects_non_add_reduce():
    _raises(
        "must be nl.add",
        lambda: nisa.activation(
            dst=_sb((4, 4)), op=nl.exp, data=_filled((4, 4)), reduce_op=nl.maximum, reduce_res=_sb((4, 1))
        ),
    )


def test_tensor_tensor_rejects_both_inputs_in_psum():
    def kern():
        a, b = _ps((4, 4)), _ps((4, 4))
        nisa.memset(a, 1.0)
        nisa.memset(b, 1.0)
        nisa.tensor_tensor(dst=_sb((4, 4)), data1=a, data2=b, op=nl.add)

    _raises("cannot both reside in PSUM", kern)


def test_tensor_tensor_rejects_shape_mismatch():
    _raises(
        "same partition size",
        lambda: nisa.tensor_tensor(dst=_sb((4, 4)), data1=_filled((4, 4)), data2=_filled((4, 5)), op=nl.add),
    )


def test_tensor_tensor_rejects_activation_only_op():
    _raises(
        "not a supported operator",
        lambda: nisa.tensor_tensor(dst=_sb((4, 4)), data1=_filled((4, 4)), data2=_filled((4, 4)), op=nl.exp),
    )


def test_tensor_scalar_rejects_operand_tile_of_wrong_shape():
    _raises(
        "must be a scalar or a \\(4, 1\\) tile",
        lambda: nisa.tensor_scalar(dst=_sb((4, 4)), data=_filled((4, 4)), op0=nl.add, operand0=_filled((4, 2))),
    )


def test_tensor_scalar_rejects_unsupported_scalar_engine_combo():
    _raises(
        "Scalar Engine",
        lambda: nisa.tensor_scalar(
            dst=_sb((4, 4)), data=_filled((4, 4)), op0=nl.subtract, operand0=1.0, engine=nisa.engine.scalar
        ),
    )


def test_tensor_copy_rejects_gpsimd_on_psum():
    def kern():
        p = _ps((4, 4))
        nisa.memset(p, 0.0)
        nisa.tensor_copy(dst=_sb((4, 4)), src=p, engine=nisa.engine.gpsimd)

    _raises("GpSimd Engine cannot access PSUM", kern)


def test_tensor_copy_rejects_hbm_operand():
    _raises("must be in SBUF or PSUM", lambda x: nisa.tensor_copy(dst=_sb((4, 4)), src=x), np.zeros((4, 4), np.float32))


def test_tensor_reduce_rejects_partition_axis():
    _raises("partition axis 0", lambda: nisa.tensor_reduce(dst=_sb((1, 4)), op=nl.add, data=_filled((4, 4)), axis=0))


def test_tensor_reduce_rejects_non_trailing_axis():
    _raises(
        "last contiguous free dims",
        lambda: nisa.tensor_reduce(dst=_sb((4, 3)), op=nl.add, data=_filled((4, 2, 3)), axis=1),
    )


def test_tensor_reduce_rejects_non_reduction_op():
    _raises(
        "not a legal reduction", lambda: nisa.tensor_reduce(dst=_sb((4, 1)), op=nl.power, data=_filled((4, 4)), axis=1)
    )


def test_max8_rejects_fewer_than_8_elements():
    _raises("must be 8..16384", lambda: nisa.max8(dst=_sb((4, 8)), src=_filled((4, 7))))


def test_max8_rejects_more_than_16384_elements():
    _raises("must be 8..16384", lambda: nisa.max8(dst=_sb((1, 8)), src=_filled((1, 16385))))


def test_nc_find_index8_rejects_fewer_than_8_elements():
    _raises(
        "must be 8..16384",
        lambda: nisa.nc_find_index8(dst=_sb((4, 8), nl.uint32), data=_filled((4, 7)), vals=_filled((4, 8))),
    )


def test_nc_find_index8_rejects_float_output():
    _raises(
        "uint16 or uint32", lambda: nisa.nc_find_index8(dst=_sb((4, 8)), data=_filled((4, 9)), vals=_filled((4, 8)))
    )


def test_nc_transpose_rejects_tensor_engine_over_128():
    def kern():
        nisa.nc_transpose(dst=_ps((128, 128)), data=_filled((128, 129)), engine=nisa.engine.tensor)

    _raises("exceeds \\[128, 128\\]", kern)


def test_iota_rejects_pattern_size_mismatch():
    _raises("dst has 8 per partition", lambda: nisa.iota(dst=_sb((4, 8)), pattern=[[1, 7]]))


def test_dma_compute_rejects_non_add_reduce():
    def kern(x):
        t = _sb((4, 4))
        nisa.dma_compute(dst=t, srcs=[x, x], reduce_op=nl.maximum)

    _raises("only nl.add", kern, np.zeros((4, 4), np.float32))
