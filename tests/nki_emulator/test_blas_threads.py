"""Emulator runs use one BLAS thread and restore the process's thread count afterwards."""

import nki
import nki.language as nl
import numpy as np
import pytest

from nki_emulator import run, runtime


def test_single_threaded_blas_inside_a_kernel_and_restored_after():
    api = runtime._openblas_thread_api()
    if api is None:
        pytest.skip("NumPy's bundled OpenBLAS not found; single_threaded_blas is a no-op here")
    get, set_ = api
    set_(2)
    seen = []

    @nki.jit
    def kern(x):
        seen.append(get())
        out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
        nl.store(out, nl.load(x))
        return out

    out, _ = run(kern, np.ones((2, 3), dtype=np.float32))
    assert seen == [1]
    assert get() == 2
    np.testing.assert_array_equal(out, np.ones((2, 3), dtype=np.float32))
