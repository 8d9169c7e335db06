"""The one tolerance table for kernel-vs-reference comparisons (kernel tests and ``kernels check`` both use it).

A kernel output ``out`` matches its reference ``ref`` when ``|out - ref| <= atol + rtol * |ref|`` element-wise
(numpy's ``allclose`` rule); integer outputs (expert ids) must be equal. Each line says why its numbers are what they
are. Kernels compute in fp32 whatever their I/O dtype; the references (``<kernel>_ref``) do the same math in fp32
torch without tiling, so differences come only from operation order and from where results are rounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    reason: str


TOLERANCES: dict[str, Tolerance] = {
    # fp32 I/O, element-wise math and short reductions (norms over <= a few thousand elements, softmax over <= 512):
    # fp32 epsilon is 1.2e-7; a different summation order over n terms moves a sum by ~sqrt(n) ulps (~50 for 2048),
    # and rsqrt/exp/divide add a few more ulps: 1e-5 relative leaves room, 1e-6 absolute covers results near zero.
    "float32": Tolerance(atol=1e-6, rtol=1e-5, reason="fp32 math, reordered sums of <= 16K terms"),
    # fp32 I/O through long matmul contractions (K up to a few thousand, fp32 PSUM accumulation on the Tensor Engine
    # in a tiled order the reference does not follow): error grows with K and |inputs|; 1e-4 as vLLM's fp32 GEMM tests.
    "float32_matmul": Tolerance(atol=1e-4, rtol=1e-4, reason="fp32 matmuls, tiled K accumulation in PSUM"),
    # bf16 outputs: kernel and reference both compute in fp32 and round once to bf16 (8-bit mantissa, one ulp =
    # 2^-8..2^-7 relative); a last-bit difference in fp32 can flip the rounding, so allow 2 ulps relative (1.6e-2)
    # and 1e-2 absolute for values near zero (as vLLM's bf16 entry in vllm/ir/tolerances.py).
    "bfloat16": Tolerance(atol=1e-2, rtol=1.6e-2, reason="bf16 output rounding (<= 2 ulps) of fp32 math"),
    # bf16 inputs through matmuls with fp32 accumulation and a bf16 intermediate (e.g. SwiGLU's h rounded to bf16
    # before the down projection): one extra rounding of every intermediate, amplified by the K-term sum.
    "bfloat16_matmul": Tolerance(atol=3e-2, rtol=3e-2, reason="bf16 intermediates rounded inside matmul chains"),
    # Bit-exact: integer outputs (expert ids) and pure data movement.
    "exact": Tolerance(atol=0.0, rtol=0.0, reason="integers and data movement must be identical"),
}


def tolerance_for(key: str) -> Tolerance:
    if key not in TOLERANCES:
        raise KeyError(f"tolerances: key={key!r}; must be one of {', '.join(TOLERANCES)}")
    return TOLERANCES[key]


def dtype_key(dtype) -> str:
    """The table key for a kernel whose outputs have ``dtype`` (torch or numpy dtype, or its name)."""
    name = str(dtype).replace("torch.", "")
    return "bfloat16" if "bfloat16" in name else "float32"


@dataclass(frozen=True)
class Comparison:
    max_abs_err: float
    max_rel_err: float  # max |out - ref| / max(|ref|, atol) over elements
    passed: bool
    detail: str = ""


def _is_int(x) -> bool:
    if hasattr(x, "is_floating_point"):
        return not x.is_floating_point()
    return np.asarray(x).dtype.kind in "iub"


def _as_array(x) -> np.ndarray:
    """float64 (or int64 for integer outputs) NumPy copy of a torch tensor or NumPy array (ml_dtypes bf16 included)."""
    if hasattr(x, "detach"):
        import torch

        x = x.detach().cpu()
        return (x.to(torch.float64) if x.is_floating_point() else x.to(torch.int64)).numpy()
    a = np.asarray(x)
    return a.astype(np.int64) if a.dtype.kind in "iub" else a.astype(np.float64)


def _flattened(x) -> list:
    """The outputs in order, nested tuples and lists (e.g. a list of caches) flattened."""
    if isinstance(x, (tuple, list)):
        return [leaf for v in x for leaf in _flattened(v)]
    return [x]


def compare(out, ref, tol: Tolerance) -> Comparison:
    """Compare one output (or a tuple of outputs, nested ones flattened, pairwise) with its reference under
    ``tol``."""
    outs, refs = _flattened(out), _flattened(ref)
    if len(outs) != len(refs):
        return Comparison(float("inf"), float("inf"), False, f"{len(outs)} outputs, reference has {len(refs)}")
    max_abs = max_rel = 0.0
    passed = True
    details = []
    for i, (o, r) in enumerate(zip(outs, refs)):
        if tuple(o.shape) != tuple(r.shape):
            detail = f"output {i} shape {tuple(o.shape)} != reference {tuple(r.shape)}"
            return Comparison(float("inf"), float("inf"), False, detail)
        a, b = _as_array(o), _as_array(r)
        if _is_int(r):
            wrong = int((a != b).sum())
            err = float(np.abs(a - b).max()) if a.size else 0.0
            max_abs = max(max_abs, err)
            if wrong:
                passed = False
                details.append(f"output {i}: {wrong} of {a.size} integers differ")
            continue
        diff = np.abs(a - b)
        diff[np.isnan(diff)] = np.inf  # NaN anywhere (unwritten memory reads as NaN) is an infinite error
        if not np.isfinite(a).all():
            passed = False
            details.append(f"output {i}: {int((~np.isfinite(a)).sum())} non-finite values")
        err = float(np.max(diff)) if diff.size else 0.0
        rel = float(np.max(diff / np.maximum(np.abs(b), max(tol.atol, 1e-30)))) if diff.size else 0.0
        max_abs, max_rel = max(max_abs, err), max(max_rel, rel)
        bad = ~(diff <= tol.atol + tol.rtol * np.abs(b))
        if bad.any():
            passed = False
            details.append(f"output {i}: {int(bad.sum())} of {a.size} elements outside atol={tol.atol} rtol={tol.rtol}")
    return Comparison(max_abs, max_rel, passed, "; ".join(details))


def assert_close(out, ref, key: str) -> None:
    """Test helper: AssertionError with the comparison unless ``out`` matches ``ref`` under ``TOLERANCES[key]``."""
    tol = tolerance_for(key)
    c = compare(out, ref, tol)
    assert c.passed, f"max abs err {c.max_abs_err:.3g}, max rel err {c.max_rel_err:.3g} ({key}): {c.detail}"
