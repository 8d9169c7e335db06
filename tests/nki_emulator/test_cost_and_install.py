"""The cost report's counts and model, and the conditional `nki` registration."""

import importlib
import sys
import types

import nki
import nki.isa as nisa
import nki.language as nl
import numpy as np
import pytest

from nki_emulator import CostReport, cost, install, is_real_nki, run

install_mod = importlib.import_module("nki_emulator.install")


@nki.jit
def scale_rows(x):
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    t = nl.load(x)
    y = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.activation(dst=y, op=nl.silu, data=t)
    nisa.tensor_scalar(dst=y, data=y, op0=nl.multiply, operand0=3.0)
    nl.store(out, y)
    return out


def test_cost_report_counts_instructions_and_bytes():
    x = np.ones((128, 1024), dtype=np.float32)
    out, rep = run(scale_rows, x)
    assert isinstance(rep, CostReport)
    assert rep.instructions == {"tensor": 0, "vector": 1, "scalar": 1, "gpsimd": 0, "dma": 2}
    assert rep.hbm_read_bytes == rep.hbm_write_bytes == x.nbytes
    assert rep.hbm_bytes == 2 * x.nbytes
    # Scalar: 1024 elements per partition at 1 per lane per cycle, 1.2 GHz.
    assert rep.busy_seconds["scalar"] == pytest.approx(1024 / cost.SCALAR_CLOCK_HZ)
    assert rep.hbm_roofline_seconds == pytest.approx(2 * x.nbytes / cost.HBM_BYTES_PER_S_PER_CORE)
    assert rep.engine_bound_seconds == pytest.approx(max(rep.busy_seconds.values()))
    # one dependency chain: load -> silu (Scalar) -> x3 (Vector, fp32: 256 lanes) -> store, each DMA 600 ns of
    # descriptors then its bytes at the core's HBM bandwidth
    dma = cost.DMA_FIXED_SECONDS + x.nbytes / cost.HBM_BYTES_PER_S_PER_CORE
    chain = 2 * dma + 1024 / cost.SCALAR_CLOCK_HZ + 1024 * 128 / 256 / cost.VECTOR_CLOCK_HZ
    assert rep.estimated_seconds == pytest.approx(chain)
    assert rep.estimated_seconds >= rep.engine_bound_seconds >= rep.hbm_roofline_seconds
    assert "estimated" in rep.format() and rep.as_dict()["bound_by"] == rep.bound_by


def _chunks(x, fresh_tiles: bool):
    """Load and scale four column chunks; ``fresh_tiles``: a new SBUF tile per chunk, else one tile reused."""
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    shared = nl.ndarray((128, 256), dtype=x.dtype, buffer=nl.sbuf)
    for c in range(4):
        t = nl.ndarray((128, 256), dtype=x.dtype, buffer=nl.sbuf) if fresh_tiles else shared
        nisa.dma_copy(dst=t, src=x[:, c * 256 : (c + 1) * 256])
        y = nl.ndarray((128, 256), dtype=x.dtype, buffer=nl.sbuf)
        nisa.activation(dst=y, op=nl.silu, data=t)
        nisa.dma_copy(dst=out[:, c * 256 : (c + 1) * 256], src=y)
    return out


def test_a_new_tile_per_iteration_overlaps_loads_with_compute_and_a_reused_one_serialises():
    x = np.ones((128, 1024), dtype=np.float32)
    _, fresh = run(nki.jit(lambda x: _chunks(x, True)), x)
    _, reused = run(nki.jit(lambda x: _chunks(x, False)), x)
    assert fresh.engine_bound_seconds == pytest.approx(reused.engine_bound_seconds)  # the same work
    # reused: chunk c+1's load waits until silu has read chunk c (write-after-read on the one tile)
    assert reused.estimated_seconds > fresh.estimated_seconds
    silu = 256 / cost.SCALAR_CLOCK_HZ
    assert reused.estimated_seconds - fresh.estimated_seconds > 2 * silu


@nki.jit
def _late_partner(x):
    """Program 1 does 8 silu passes before the barrier, program 0 none; both store after it."""
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    t = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    if nl.program_id(0) == 1:
        for _ in range(8):
            nisa.activation(dst=t, op=nl.silu, data=t)
    nisa.core_barrier(data=out, cores=(0, 1))
    if nl.program_id(0) == 0:
        nisa.dma_copy(dst=out, src=t)
    return out


def test_core_barrier_holds_the_early_program_until_its_partner_arrives():
    x = np.ones((128, 512), dtype=np.float32)
    _, rep = run(_late_partner[2], x)
    load = cost.DMA_FIXED_SECONDS + x.nbytes / cost.HBM_BYTES_PER_S_PER_CORE
    silu = 512 / cost.SCALAR_CLOCK_HZ
    # program 0's store starts after program 1's eight silu passes (plus the barrier's GpSimd issue cost)
    assert rep.estimated_seconds >= 2 * load + 8 * silu


def test_cost_report_small_instructions_pay_min_ii():
    _, rep = run(scale_rows, np.ones((1, 8), dtype=np.float32))
    assert rep.busy_seconds["scalar"] == pytest.approx(cost.MIN_II_CYCLES / cost.SCALAR_CLOCK_HZ)


def test_cost_report_pe_roofline_from_macs():
    @nki.jit
    def mm(a, b):
        out = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.shared_hbm)
        nl.store(out, nl.copy(nl.matmul(nl.load(a), nl.load(b), transpose_x=True)))
        return out

    a = np.ones((128, 128), dtype=np.float32).astype(nl.bfloat16)
    b = np.ones((128, 512), dtype=np.float32).astype(nl.bfloat16)
    out, rep = run(mm, a, b)
    assert np.all(out == 128)
    assert rep.macs == 128 * 128 * 512
    assert rep.pe_roofline_seconds == pytest.approx(512 / cost.TENSOR_CLOCK_HZ)


def test_install_is_idempotent_and_registers_modules():
    assert install() is True
    assert install() is True
    assert sys.modules["nki.language"] is nl and sys.modules["nki.isa"] is nisa
    assert not is_real_nki()
    import nki.typing as nt

    assert nt.tensor[128, 512] == (128, 512)


def test_placeholder_nki_counts_as_not_importable(tmp_path, monkeypatch):
    pkg = tmp_path / "nki"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('WRONG PACKAGE')\n")
    saved = {k: v for k, v in sys.modules.items() if k == "nki" or k.startswith("nki.")}
    for k in saved:
        monkeypatch.delitem(sys.modules, k)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert install_mod._real_nki_importable() is False
        assert "nki" not in sys.modules
    finally:
        sys.modules.update(saved)


def test_real_nki_is_detected(monkeypatch):
    fake = types.ModuleType("nki")
    fake.jit, fake.language = object(), object()
    saved = sys.modules["nki"]
    monkeypatch.setitem(sys.modules, "nki", fake)
    try:
        assert install_mod._real_nki_importable() is True
    finally:
        sys.modules["nki"] = saved
