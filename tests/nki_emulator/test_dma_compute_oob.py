"""``nisa.dma_compute`` scatter-add with ``oob_mode``: skip leaves out-of-range rows alone, error rejects them."""

import nki
import nki.isa as nisa
import nki.language as nl
import numpy as np
import pytest

from nki_emulator import NkiEmulatorError, run

SEED = 11


@nki.jit
def _scatter_add(acc, src_data, indices, skip):
    out = nl.ndarray(acc.shape, dtype=acc.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=acc)
    P, F = src_data.shape
    src = nl.ndarray((P, F), dtype=src_data.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=src, src=src_data)
    idx = nl.ndarray((P, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=idx, src=indices)
    rows = out.ap(pattern=[[F, P], [1, F]], vector_offset=idx, indirect_dim=0)
    mode = nisa.oob_mode.skip if skip else nisa.oob_mode.error
    nisa.dma_compute(dst=rows, srcs=[rows, src], reduce_op=nl.add, oob_mode=mode)
    return out


def _inputs():
    rng = np.random.default_rng(SEED)
    acc = rng.standard_normal((6, 5)).astype(np.float32)
    src = rng.standard_normal((4, 5)).astype(np.float32)
    idx = np.array([[3], [6], [0], [7]], dtype=np.int32)  # rows 6 and 7 are out of range (padding slots)
    return acc, src, idx


def test_dma_compute_scatter_add_skips_out_of_bounds_rows_with_oob_skip():
    acc, src, idx = _inputs()
    out, _ = run(_scatter_add, acc, src, idx, True)
    ref = acc.copy()
    ref[3] += src[0]
    ref[0] += src[2]
    np.testing.assert_allclose(out, ref, rtol=1e-6)


def test_dma_compute_rejects_out_of_bounds_rows_with_oob_error():
    acc, src, idx = _inputs()
    with pytest.raises(NkiEmulatorError, match="out of bounds"):
        run(_scatter_add, acc, src, idx, False)


def test_dma_compute_rejects_duplicate_in_bounds_rows_even_with_oob_skip():
    acc, src, _ = _inputs()
    idx = np.array([[3], [3], [0], [9]], dtype=np.int32)
    with pytest.raises(NkiEmulatorError, match="not unique"):
        run(_scatter_add, acc, src, idx, True)
