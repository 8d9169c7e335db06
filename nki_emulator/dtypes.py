"""NKI data types as NumPy dtypes (bfloat16 and float8 from ``ml_dtypes``) and the hardware's casting rules.

The documented dtype table is ``aws-neuron-sdk:nki/api/nki.api.shared.rst`` ("Supported Data Types"). Each NKI dtype
is a ``numpy.dtype`` here, so ``tile.dtype == nl.bfloat16`` and ``nl.ndarray(x.shape, dtype=x.dtype)`` behave as
kernels expect when their arguments are NumPy arrays.
"""

import ml_dtypes
import numpy as np

from .errors import check

bool_ = np.dtype(np.uint8)  # "boolean stored as uint8" (nki.api.shared.rst)
int8 = np.dtype(np.int8)
int16 = np.dtype(np.int16)
int32 = np.dtype(np.int32)
uint8 = np.dtype(np.uint8)
uint16 = np.dtype(np.uint16)
uint32 = np.dtype(np.uint32)
float16 = np.dtype(np.float16)
float32 = np.dtype(np.float32)
bfloat16 = np.dtype(ml_dtypes.bfloat16)
# tfloat32 (1S,8E,10M) has no NumPy type: stored as float32 (a documented gap: no 10-bit mantissa rounding).
tfloat32 = np.dtype(np.float32)
float8_e4m3 = np.dtype(ml_dtypes.float8_e4m3)  # IEEE-style e4m3 with inf, max 240 (trn2 "fp8_e4")
float8_e4m3fn = np.dtype(ml_dtypes.float8_e4m3fn)  # OCP e4m3, no inf, max 448
float8_e5m2 = np.dtype(ml_dtypes.float8_e5m2)
float8_e8m0fnu = np.dtype(ml_dtypes.float8_e8m0fnu)

# MX packed types: 4 elements per container, "custom data type for nki.isa.nc_matmul_mx and nki.isa.quantize_mx on
# NeuronCore-v4" (nki.api.shared.rst, note [#2]). Opaque containers here (fp8 x4 = 4 bytes, fp4 x4 = 2 bytes): they can
# be allocated, DMA-copied bit-exactly and zero-filled by memset (NKI 0.3.0 migration guide: x4 memset value must be 0);
# the trn3 instructions that compute on them are not emulated.
float8_e4m3fn_x4 = np.dtype([("float8_e4m3fn_x4", np.uint8, (4,))])
float8_e5m2_x4 = np.dtype([("float8_e5m2_x4", np.uint8, (4,))])
float4_e2m1fn_x4 = np.dtype([("float4_e2m1fn_x4", np.uint16)])
PACKED_DTYPES = frozenset({float8_e4m3fn_x4, float8_e5m2_x4, float4_e2m1fn_x4})

FLOAT_DTYPES = frozenset({float16, float32, bfloat16, float8_e4m3, float8_e4m3fn, float8_e5m2, float8_e8m0fnu})
FP8_DTYPES = frozenset({float8_e4m3, float8_e4m3fn, float8_e5m2})
INT_DTYPES = frozenset({int8, int16, int32, uint8, uint16, uint32})
# nc_matmul inputs (isa docstring, "Data types"): float8_e4m3/float8_e5m2/bfloat16/float16/tfloat32/float32
# (+ float8_e4m3fn on NeuronCore-v4 only).
MATMUL_INPUT_DTYPES = frozenset({float8_e4m3, float8_e5m2, bfloat16, float16, float32})

# Fresh on-chip memory reads as NaN for floats, as the official simulator fills it (research/nki.md, section 3.1);
# integers get this sentinel (the simulator's is 4; any non-zero value exposes reads of unwritten memory).
INT_FRESH_SENTINEL = 4


def as_dtype(dtype: object, where: str = "dtype") -> np.dtype:
    """Normalise a dtype argument (NKI dtype, NumPy dtype or type) to a ``numpy.dtype``; reject unknown ones."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    check(
        dt is not None and (dt in FLOAT_DTYPES or dt in INT_DTYPES or dt in PACKED_DTYPES),
        where,
        f"dtype={dtype!r}; not a supported NKI dtype (nki.api.shared.rst, 'Supported Data Types')",
    )
    return dt


def is_float(dtype: np.dtype) -> bool:
    """True for floating-point dtypes (including bf16 and fp8)."""
    return np.dtype(dtype) in FLOAT_DTYPES


def to_fp32(values: np.ndarray) -> np.ndarray:
    """Read values as the engines do: every arithmetic input is converted to float32 (isa docstrings)."""
    return np.asarray(values).astype(np.float32, copy=False)


def cast_from_fp32(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Convert float32 results to ``dtype`` as the engines write them.

    Floats: float32 -> dtype with round-to-nearest-even (``ml_dtypes`` for bf16 and fp8). Integers: round half to
    even, saturate to the dtype's range, NaN -> 0 (the hardware's float->int conversion is not documented; this is
    the conservative choice and is listed as a gap in docs/emulator.md).
    """
    dtype = np.dtype(dtype)
    v = np.asarray(values, dtype=np.float32)
    if dtype in FLOAT_DTYPES:
        return v.astype(dtype)
    info = np.iinfo(dtype)
    with np.errstate(invalid="ignore"):
        r = np.rint(np.nan_to_num(v, nan=0.0, posinf=info.max, neginf=info.min).astype(np.float64))
    return np.clip(r, info.min, info.max).astype(dtype)


def convert(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast to ``dtype`` through float32 (DMA and engine casts); same-dtype and int->int copies are bit-exact."""
    values = np.asarray(values)
    dtype = np.dtype(dtype)
    if values.dtype == dtype:
        return values
    if values.dtype in INT_DTYPES and dtype in INT_DTYPES:
        info = np.iinfo(dtype)
        return np.clip(values.astype(np.int64), info.min, info.max).astype(dtype)
    return cast_from_fp32(to_fp32(values), dtype)
