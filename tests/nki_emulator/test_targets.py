"""The trn1 hardware table: the cost model and the capacity checks describe the chosen target (targets.py)."""

import nki
import nki.isa as nisa
import nki.language as nl
import numpy as np
import pytest

from nki_emulator import cost, run, targets
from nki_emulator.errors import NkiEmulatorError


@nki.jit
def _scale_rows(x):
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    t = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    y = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.activation(dst=y, op=nl.silu, data=t)
    nisa.tensor_scalar(dst=y, data=y, op0=nl.multiply, operand0=3.0)
    nisa.dma_copy(dst=out, src=y)
    return out


def test_trn1_costs_the_chain_with_its_own_clocks_widths_and_bandwidth():
    x = np.ones((128, 1024), dtype=np.float32)
    with targets.use("trn1"):
        _, rep = run(_scale_rows, x)
    # trainium_inferentia2_arch.rst: Scalar 1.4 GHz, Vector 1.12 GHz, 128 elements per cycle each; HBM 820 GB/s for
    # 2 cores; the 600 ns descriptor cost as on trn2
    dma = cost.DMA_FIXED_SECONDS + x.nbytes / (820e9 / 2)
    chain = 2 * dma + 1024 * 128 / 128 / 1.4e9 + 1024 * 128 / 128 / 1.12e9
    assert rep.estimated_seconds == pytest.approx(chain)
    assert rep.hbm_roofline_seconds == pytest.approx(2 * x.nbytes / (820e9 / 2))
    _, on_trn2 = run(_scale_rows, x)  # the default target again after the block (a trn2 core: 2.9 TB/s / 8)
    assert on_trn2.hbm_roofline_seconds == pytest.approx(2 * x.nbytes / (2.9e12 / 8))


@nki.jit
def _wide_tile(x):
    out = nl.ndarray((128, 1), dtype=x.dtype, buffer=nl.shared_hbm)
    t = nl.ndarray((128, 46_250), dtype=nl.float32, buffer=nl.sbuf)  # 185,000 B per partition
    nisa.memset(dst=t, value=0.0)
    nisa.dma_copy(dst=out, src=t[:, 0:1])
    return out


def test_a_tile_that_fits_trn2_sbuf_is_rejected_on_trn1_naming_the_capacity():
    x = np.zeros((128, 1), dtype=np.float32)
    run(_wide_tile, x)  # trn2: 212,728 usable bytes per partition
    usable = 192 * 1024 - targets.SBUF_COMPILER_RESERVE
    with targets.use("trn1"), pytest.raises(NkiEmulatorError, match=rf"exceeds the usable {usable} B per partition"):
        run(_wide_tile, x)


@nki.jit
def _barrier(x):
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    nisa.core_barrier(data=out, cores=(0, 1))
    return out


def test_trn1_has_no_lnc_2_logical_cores():
    with targets.use("trn1"), pytest.raises(NkiEmulatorError, match=r"target=trn1 \(NeuronCore-v2\) has no LNC=2"):
        run(_barrier[2], np.zeros((4, 4), dtype=np.float32))


def test_an_unknown_target_is_named():
    with pytest.raises(ValueError, match=r"target='trn3'; must be one of trn2, trn1"):
        targets.get("trn3")
