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
    assert rep.estimated_seconds == pytest.approx(max(rep.busy_seconds.values()))
    assert rep.estimated_seconds >= rep.hbm_roofline_seconds
    assert "estimated" in rep.format() and rep.as_dict()["bound_by"] == rep.bound_by


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
