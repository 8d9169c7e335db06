"""``nki.isa``: the instructions, executed eagerly in NumPy with the documented constraints enforced.

Every function follows its docstring in ``aws-neuron-sdk:nki/api/nki/isa/__init__.py`` (argument names, defaults,
``dst`` first). Each call validates, computes the whole tile at once in float32 (engines compute in fp32), casts to
``dst.dtype`` (round-to-nearest-even) and records one instruction in the cost counter.
"""

from __future__ import annotations

import functools
import math
from enum import Enum

import numpy as np

from . import context, cost, dtypes, targets
from .errors import NkiEmulatorError, check
from .hardware import (
    DMA_COMPUTE_MAX_SRCS,
    GEMM_MOVING_FMAX,
    GEMM_STATIONARY_FMAX,
    ISA_PATTERN_MAX_DIMS,
    NC_TRANSPOSE_TENSOR_MAX,
    NC_TRANSPOSE_VECTOR_MAX,
    PMAX,
    TOPK8,
    TOPK8_MAX_ELEMS,
    TOPK8_MIN_ELEMS,
)
from .ops import OPS, MathOp
from .tensor import (
    HBM,
    PSUM_MATMUL,
    PSUM_MATMUL_READ,
    PSUM_OTHER,
    MemoryRegion,
    NkiTensor,
)

NkiValidationError = NkiEmulatorError  # the real package's name for constraint violations


class engine(Enum):
    """Neuron Device engines."""

    tensor = 1
    vector = 5
    scalar = 2
    gpsimd = 3
    dma = 4
    sync = 6
    unknown = 0


tensor_engine = engine.tensor
vector_engine = engine.vector
scalar_engine = engine.scalar
gpsimd_engine = engine.gpsimd
unknown_engine = engine.unknown


class reduce_cmd(Enum):
    """Engine register reduce commands."""

    idle = 0
    reset = 1
    reduce = 2
    reset_reduce = 3
    load_reduce = 4


class dge_mode(Enum):
    unknown = 0
    swdge = 1
    hwdge = 2
    none = 3


class oob_mode(Enum):
    error = 0
    skip = 1


class matmul_perf_mode(Enum):
    none = "none"
    double_row = "double_row"


@functools.total_ordering
class nc_version(Enum):
    """NeuronCore generation; ordered, as kernels compare ``get_nc_version() >= nc_version.gen3`` (nki-library)."""

    gen2 = 2
    gen3 = 3
    gen4 = 4

    def __lt__(self, other):
        if not isinstance(other, nc_version):
            return NotImplemented
        return self.value < other.value

    __hash__ = Enum.__hash__


class dma_engine(Enum):
    dma = 1
    gpsimd_dma = 2


class NkiInstruction:
    """Handle returned by instructions; ``depends_on`` only matters to the real scheduler."""

    def __init__(self, handle: str = ""):
        self.handle = handle

    def depends_on(self, *producers: NkiInstruction) -> NkiInstruction:
        return self


class VirtualRegister:
    """An engine register holding an integer (``nisa.register_alloc``)."""

    def __init__(self, state=None, frozen=False):
        self.value = 0 if state is None else int(state)
        self.frozen = bool(frozen)  # a loop induction variable: read-only (nki-language-guide.rst, registers)

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __repr__(self) -> str:
        return f"VirtualRegister({self.value})"


def get_nc_version() -> nc_version:
    """The emulator models trn2 (NeuronCore-v3)."""
    return nc_version.gen3


def get_nc_sub_version() -> int:
    return 0


# ----- shared validation / data movement helpers ----------------------------------------------------------------
def _tensor(t, where: str, name: str) -> NkiTensor:
    check(isinstance(t, NkiTensor), where, f"{name}={type(t).__name__}; must be an NkiTensor")
    return t


def _on_chip(t, where: str, name: str, allow_psum: bool = True) -> NkiTensor:
    _tensor(t, where, name)
    ok = t.buffer is MemoryRegion.sbuf or (allow_psum and t.buffer is MemoryRegion.psum)
    check(ok, where, f"{name}={t.describe()}; must be in {'SBUF or PSUM' if allow_psum else 'SBUF'}")
    check(t.shape[0] <= PMAX, where, f"{name} partition dim={t.shape[0]}; exceeds pmax={PMAX}")
    check(t._indirect is None, where, f"{name}={t.describe()}; indirect views are only for DMA (trn2)")
    return t


def _same_layout(a: NkiTensor, b: NkiTensor, where: str, an: str, bn: str) -> None:
    check(
        a.shape[0] == b.shape[0] and a.free_size == b.free_size,
        where,
        f"{an}{list(a.shape)} vs {bn}{list(b.shape)}; must have the same partition size and elements per partition",
    )


def _not_both_psum(a: NkiTensor, b: NkiTensor, where: str) -> None:
    check(
        not (a.buffer is MemoryRegion.psum and b.buffer is MemoryRegion.psum),
        where,
        f"inputs {a.describe()} and {b.describe()}; cannot both reside in PSUM",
    )


def _no_gpsimd_psum(eng: engine, where: str, *ts: NkiTensor) -> None:
    if eng is engine.gpsimd:
        for t in ts:
            check(t.buffer is not MemoryRegion.psum, where, f"{t.describe()}; GpSimd Engine cannot access PSUM")


def _read2d(t: NkiTensor) -> np.ndarray:
    """Elements as [partitions, elements per partition] in the view's dtype; marks PSUM matmul results as read."""
    if t.buffer is MemoryRegion.psum:
        st = t.psum_state()
        st[st == PSUM_MATMUL] = PSUM_MATMUL_READ
    return t.read_raw().reshape(t.shape[0], -1)


def _read32(t: NkiTensor) -> np.ndarray:
    return dtypes.to_fp32(_read2d(t))


def _write(dst: NkiTensor, values: np.ndarray, *, exact: bool = False) -> None:
    """Write [P, F] values (float32, or dst-dtype when ``exact``) into ``dst``; non-matmul PSUM writes are tagged."""
    vals = values.reshape(dst.shape)
    vals = dtypes.convert(vals, dst.dtype) if not exact else vals
    dst.write_raw(vals)
    if dst.buffer is MemoryRegion.psum:
        dst.psum_state()[...] = PSUM_OTHER


def _scalar_or_vector(x, data: NkiTensor, where: str, name: str, require_fp32: bool = True):
    """An immediate float or a [P, 1] tile, as an array broadcastable against [P, F]."""
    if isinstance(x, NkiTensor):
        _on_chip(x, where, name)
        check(
            x.shape[0] == data.shape[0] and x.free_size == 1,
            where,
            f"{name}{list(x.shape)}; must be a scalar or a ({data.shape[0]}, 1) tile",
        )
        if require_fp32:
            check(x.dtype == dtypes.float32, where, f"{name} dtype={x.dtype.name}; must be float32")
        return _read32(x)
    check(isinstance(x, (int, float, np.integer, np.floating)), where, f"{name}={x!r}; must be a scalar or a tile")
    return np.float32(x)


def _op(op, where: str, kinds: tuple[str, ...], name: str = "op") -> MathOp:
    check(
        isinstance(op, MathOp) and op.kind in kinds,
        where,
        f"{name}={op!r}; not a supported operator here (nki.api.shared.rst, 'Supported Math Operators')",
    )
    return op


def _engine_of(eng, default: engine) -> engine:
    return default if eng in (None, engine.unknown) else eng


def _is16(*ts: NkiTensor) -> bool:
    return all(t.dtype.itemsize == 2 and dtypes.is_float(t.dtype) for t in ts)


def _count(eng: engine, op: str, t: NkiTensor, *, all16: bool = False, factor: float = 1.0) -> NkiInstruction:
    c = context.current().cost
    free = t.free_size
    if eng is engine.scalar:
        cyc = cost.scalar_cycles(free)
    elif eng is engine.gpsimd:
        cyc = cost.gpsimd_cycles(free)
    else:
        eng = engine.vector
        cyc = cost.vector_cycles(free, all16)
    c.compute(eng.name, op, t.size, cyc * factor)
    return NkiInstruction(op)


def _apply_binary(op: MathOp, a, b, dtype: np.dtype | None = None):
    """Arithmetic ops in fp32; bitvec ops on the integer bit patterns."""
    if op.kind == "bitvec":
        return op.fn(np.asarray(a).astype(np.int64), np.asarray(b).astype(np.int64))
    return op.fn(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32))


# ----- DMA -------------------------------------------------------------------------------------------------------
def _dma_check(t: NkiTensor, where: str, name: str) -> None:
    _tensor(t, where, name)
    check(
        t.buffer is not MemoryRegion.psum,
        where,
        f"{name}={t.describe()}; DMA cannot read or write PSUM (move it to SBUF with nisa.tensor_copy first)",
    )
    if t.buffer is MemoryRegion.sbuf:
        check(t.shape[0] <= PMAX, where, f"{name} partition dim={t.shape[0]}; exceeds pmax={PMAX}")


def _dma_count(op: str, dst: NkiTensor, src_list: list[NkiTensor]) -> None:
    read = sum(s.size * s.dtype.itemsize for s in src_list)
    written = dst.size * dst.dtype.itemsize
    hbm_r = sum(s.size * s.dtype.itemsize for s in src_list if s.buffer in HBM)
    hbm_w = written if dst.buffer in HBM else 0
    context.current().cost.dma(op, max(read, written), hbm_r, hbm_w)


def dma_copy(
    dst, src, priority=None, oob_mode=oob_mode.error, dge_mode=dge_mode.unknown, engine=engine.unknown, name=None
):
    """``dst = src`` through the DMA engines, casting through float32; indirect gather/scatter via ``.ap(...)``."""
    where = "nisa.dma_copy"
    _dma_check(dst, where, "dst")
    _dma_check(src, where, "src")
    check(
        dst.size == src.size,
        where,
        f"dst{list(dst.shape)} has {dst.size} elements, src{list(src.shape)} has {src.size}; counts must match",
    )
    check(
        not (dst._indirect is not None and src._indirect is not None),
        where,
        "dst and src both indirect; at most one may be",
    )
    skip = oob_mode is globals()["oob_mode"].skip
    vals = src.read_raw()
    mask = src.oob_mask()
    if mask is not None:
        check(skip, where, f"src={src.describe()}: indirect index out of bounds; oob_mode=error (dma_copy doc)")
    vals = dtypes.convert(vals, dst.dtype).reshape(dst.shape)
    if mask is not None:
        keep = mask.reshape(dst.shape)
        vals = np.where(keep, vals, dst.read_raw())
    dst.write_raw(vals, skip_invalid=skip)
    _dma_count("dma_copy", dst, [src])
    return NkiInstruction("dma_copy")


def dma_transpose(dst, src, axes=None, priority=None, dge_mode=dge_mode.unknown, oob_mode=oob_mode.error, name=None):
    """Transpose on the DMA engines: 2-D (1, 0), 3-D (2, 1, 0), 4-D (3, 1, 2, 0)."""
    where = "nisa.dma_transpose"
    _dma_check(dst, where, "dst")
    _dma_check(src, where, "src")
    check(dst.buffer is MemoryRegion.sbuf, where, f"dst={dst.describe()}; must be in SBUF")
    check(
        src.dtype == dst.dtype and src.dtype.itemsize in (2, 4),
        where,
        f"src dtype={src.dtype.name}, dst dtype={dst.dtype.name}; must be equal and 2 or 4 bytes",
    )
    default = {2: (1, 0), 3: (2, 1, 0), 4: (3, 1, 2, 0)}
    check(src.ndim in default, where, f"src ndim={src.ndim}; must be 2, 3 or 4")
    axes = tuple(axes) if axes is not None else default[src.ndim]
    check(axes == default[src.ndim], where, f"axes={axes}; supported: {default[src.ndim]}")
    vals = np.transpose(src.read_raw(), axes)
    check(vals.size == dst.size, where, f"dst{list(dst.shape)} vs transposed {list(vals.shape)}; sizes differ")
    dst.write_raw(vals.reshape(dst.shape))
    _dma_count("dma_transpose", dst, [src])
    return NkiInstruction("dma_transpose")


def dma_compute(dst, srcs, reduce_op, scales=None, unique_indices=True, oob_mode=oob_mode.error, name=None):
    """``dst = srcs[0] + srcs[1] + ...`` in the DMA engines (float32), incl. scatter-add read-modify-write.

    ``oob_mode=skip``: elements whose indirect index is out of bounds are neither read (they count as 0) nor written
    (dma_compute doc, ``oob_mode``), so padding slots of a scatter can carry out-of-range indices.
    """
    where = "nisa.dma_compute"
    _dma_check(dst, where, "dst")
    srcs = list(srcs)
    check(1 <= len(srcs) <= DMA_COMPUTE_MAX_SRCS, where, f"len(srcs)={len(srcs)}; must be 1..{DMA_COMPUTE_MAX_SRCS}")
    check(reduce_op is OPS["add"], where, f"reduce_op={reduce_op!r}; only nl.add is supported")
    check(scales is None or all(float(s) == 1.0 for s in scales), where, f"scales={scales}; must all be 1.0")
    check(unique_indices, where, "unique_indices=False; non-unique indices are not supported")
    skip = oob_mode is globals()["oob_mode"].skip
    total = np.zeros(dst.size, dtype=np.float32)
    for i, s in enumerate(srcs):
        _dma_check(s, where, f"srcs[{i}]")
        check(s.size == dst.size, where, f"srcs[{i}] has {s.size} elements, dst {dst.size}; counts must match")
        if s._indirect is not None and s._indirect.kind == "vector":
            idx = s._indirect.index.read_raw().reshape(-1).astype(np.int64)
            if skip:  # skipped (out-of-bounds) indices touch nothing, so only in-bounds ones must be unique
                idx = idx[(idx >= 0) & (idx < s._indirect.bound)]
            check(len(np.unique(idx)) == idx.size, where, f"srcs[{i}] indices not unique; unique_indices=True")
        check(
            skip or s.oob_mask() is None,
            where,
            f"srcs[{i}]: indirect index out of bounds; oob_mode=error (dma_compute doc)",
        )
        total += dtypes.to_fp32(s.read_raw()).reshape(-1)
    check(
        skip or dst.oob_mask() is None,
        where,
        "dst: indirect index out of bounds; oob_mode=error (dma_compute doc)",
    )
    dst.write_raw(dtypes.convert(total, dst.dtype).reshape(dst.shape), skip_invalid=skip)
    _dma_count("dma_compute", dst, srcs)
    return NkiInstruction("dma_compute")


# ----- Tensor Engine ---------------------------------------------------------------------------------------------
def nc_matmul(
    dst,
    stationary,
    moving,
    is_stationary_onezero=False,
    is_moving_onezero=False,
    is_transpose=False,
    accumulate=None,
    tile_position=(),
    tile_size=(),
    perf_mode=matmul_perf_mode.none,
    name=None,
):
    """``dst[M, N] (PSUM fp32) = stationary[K, M].T @ moving[K, N]``, fp32 accumulation (isa doc, nc_matmul)."""
    where = "nisa.nc_matmul"
    _tensor(dst, where, "dst")
    for nm, t in (("stationary", stationary), ("moving", moving)):
        _tensor(t, where, nm)
        check(t.buffer is MemoryRegion.sbuf, where, f"{nm}={t.describe()}; nc_matmul inputs must be in SBUF")
        check(t._indirect is None, where, f"{nm}={t.describe()}; tensor indirection is NeuronCore-v4 only")
    check(dst.buffer is MemoryRegion.psum, where, f"dst={dst.describe()}; nc_matmul output must be a PSUM tile")
    double = perf_mode is matmul_perf_mode.double_row
    target = targets.current()
    check(
        not double or target.fp8_double_row,
        where,
        f"perf_mode=double_row on target={target.name} ({target.core}); FP8 double-row is trn2's Tensor Engine",
    )
    row_max, col_max = PMAX, GEMM_STATIONARY_FMAX
    if tile_position or tile_size:
        check(
            len(tile_position) == 2 and len(tile_size) == 2,
            where,
            f"tile_position={tile_position}, tile_size={tile_size}; both must be set (row, column)",
        )
        row_max, col_max = int(tile_size[0]), int(tile_size[1])
        check(row_max in (32, 64, 128) and col_max in (32, 64, 128), where, f"tile_size={tile_size}; 32, 64 or 128")
        check(
            all(int(p) % s == 0 and int(p) < PMAX for p, s in zip(tile_position, tile_size)),
            where,
            f"tile_position={tile_position}; must be multiples of tile_size {tile_size} within 128",
        )
        check(not (double and col_max != 128), where, "double_row cannot be combined with column tiling")
    k, ks = stationary.shape[0], moving.shape[0]
    check(k == ks, where, f"stationary K={k}, moving K={ks}; contraction (partition) dims must match")
    check(k <= row_max, where, f"contraction K={k}; exceeds {row_max} (partition / tile row size)")
    if double:
        for nm, t in (("stationary", stationary), ("moving", moving)):
            check(
                t.dtype in (dtypes.float8_e4m3, dtypes.float8_e5m2),
                where,
                f"{nm} dtype={t.dtype.name}; double_row needs float8_e4m3/float8_e5m2",
            )
            check(t.ndim >= 3 and t.shape[1] == 2, where, f"{nm}{list(t.shape)}; double_row needs [K, 2, ...]")
    m = stationary.free_size // (2 if double else 1)
    n = moving.free_size // (2 if double else 1)
    check(
        m <= col_max,
        where,
        f"stationary{list(stationary.shape)} free size M={m}; exceeds gemm_stationary_fmax={col_max}",
    )
    check(
        n <= GEMM_MOVING_FMAX,
        where,
        f"moving{list(moving.shape)} free size N={n}; exceeds gemm_moving_fmax={GEMM_MOVING_FMAX} (trn2)",
    )
    check(
        dst.shape[0] == m and dst.free_size == n,
        where,
        f"dst{list(dst.shape)}; must be [M={m}, N={n}] (stationary free x moving free)",
    )
    for nm, t in (("stationary", stationary), ("moving", moving)):
        check(
            t.dtype in dtypes.MATMUL_INPUT_DTYPES,
            where,
            f"{nm} dtype={t.dtype.name}; must be fp8_e4m3/fp8_e5m2/bf16/fp16/tf32/fp32 (trn2)",
        )
    fp32_in = [t.dtype == dtypes.float32 for t in (stationary, moving)]
    check(
        all(fp32_in) or not any(fp32_in),
        where,
        f"stationary {stationary.dtype.name} with moving {moving.dtype.name}; fp32 cannot mix with other dtypes",
    )
    if is_transpose:
        check(
            dst.dtype == stationary.dtype,
            where,
            f"dst dtype={dst.dtype.name}; transpose output keeps the input dtype {stationary.dtype.name}",
        )
    else:
        check(dst.dtype == dtypes.float32, where, f"dst dtype={dst.dtype.name}; must be float32 on trn2 (NC-v3)")
    s = _read32(stationary)
    mv = _read32(moving)
    if double:
        s = s.reshape(k, 2, m).transpose(1, 0, 2).reshape(2 * k, m)
        mv = mv.reshape(k, 2, n).transpose(1, 0, 2).reshape(2 * k, n)
    if is_transpose and mv.shape[0] == mv.shape[1] and np.array_equal(mv, np.eye(mv.shape[0], dtype=np.float32)):
        res = s.T.copy()  # bit-accurate transpose mode (NeuronCore-v3)
    else:
        with np.errstate(all="ignore"):
            res = np.matmul(s.T, mv, dtype=np.float32)
    state = dst.psum_state().reshape(m, n)
    if is_transpose:
        dst.write_raw(dtypes.convert(res, dst.dtype).reshape(dst.shape))
        state[...] = PSUM_MATMUL
    else:
        acc = bool(accumulate) if accumulate is not None else None
        if acc is True:
            check(
                np.all(np.isin(state, (PSUM_MATMUL, PSUM_MATMUL_READ))),
                where,
                f"dst={dst.describe()}: accumulate=True onto PSUM not initialised by a matmul; undefined behaviour "
                "(nc_matmul doc, 'Accumulation mode': only valid after a matmul with accumulate=False; accumulating "
                "onto memset / tensor_copy values is undefined on NeuronCore-v2/v3)",
            )
        if acc is None:
            # None: "the compiler automatically infers the correct flag - first write overwrites, subsequent writes
            # accumulate" (nc_matmul doc, 'Accumulation mode'; NKI 0.3.0 release notes): the first matmul onto
            # memory a memset / tensor_copy initialised (PSUM_OTHER) overwrites it, as onto fresh memory; so does
            # the first matmul after the result was read out (PSUM_MATMUL_READ): a new accumulation group. AWS's
            # kernels rely on this for PSUM tiles reused across unrolled iterations (nki-library 2.29
            # mlp_cte_projection gate_proj_psum, attention_tkg), so it is the inference the compiler makes.
            add = state == PSUM_MATMUL
        else:
            add = np.full((m, n), acc, dtype=bool)
        old = dtypes.to_fp32(dst.read_raw()).reshape(m, n)
        out = np.where(add, old + res, res).astype(np.float32)
        dst.write_raw(out.reshape(dst.shape))
        state[...] = PSUM_MATMUL
    c = context.current().cost
    macs = (2 * k if double else k) * m * n
    c.macs += 0 if is_transpose else macs
    factor = cost.TENSOR_FP32_SLOWDOWN if fp32_in[0] else 1.0
    if double:
        factor /= cost.TENSOR_DOUBLE_ROW_SPEEDUP
    c.compute("tensor", "nc_transpose" if is_transpose else "nc_matmul", macs, n * factor)
    return NkiInstruction("nc_matmul")


def nc_transpose(dst, data, engine=engine.unknown, name=None):
    """2-D transpose between partition and free axes: Tensor Engine (SBUF -> PSUM, <=128x128) or Vector (<=32x32)."""
    where = "nisa.nc_transpose"
    _tensor(dst, where, "dst")
    _on_chip(data, where, "data")
    _on_chip(dst, where, "dst")
    eng = globals()["engine"]
    if engine in (None, eng.unknown):
        engine = eng.tensor if (data.buffer is MemoryRegion.sbuf and dst.buffer is MemoryRegion.psum) else eng.vector
    check(dst.dtype == data.dtype, where, f"dst dtype={dst.dtype.name}; must equal data dtype {data.dtype.name}")
    p, f = data.shape[0], data.free_size
    limit = NC_TRANSPOSE_TENSOR_MAX if engine is eng.tensor else NC_TRANSPOSE_VECTOR_MAX
    check(p <= limit and f <= limit, where, f"data{list(data.shape)}; exceeds [{limit}, {limit}] on {engine.name}")
    check(dst.shape[0] == f and dst.free_size == p, where, f"dst{list(dst.shape)}; must be [{f}, {p}]")
    if engine is eng.tensor:
        check(
            data.buffer is MemoryRegion.sbuf and dst.buffer is MemoryRegion.psum,
            where,
            f"data={data.describe()}, dst={dst.describe()}; Tensor Engine reads SBUF and writes PSUM",
        )
    vals = _read2d(data).T.copy()
    dst.write_raw(vals.reshape(dst.shape))
    if dst.buffer is MemoryRegion.psum:
        dst.psum_state()[...] = PSUM_MATMUL if engine is eng.tensor else PSUM_OTHER
    if engine is eng.tensor:
        context.current().cost.compute("tensor", "nc_transpose", data.size, p)
        return NkiInstruction("nc_transpose")
    return _count(eng.vector, "nc_transpose", data, all16=_is16(data))


# ----- Vector / Scalar / GpSimd ----------------------------------------------------------------------------------
def tensor_copy(dst, src, engine=engine.unknown, name=None):
    """Copy within SBUF/PSUM; bit-exact when dtypes match, else through float32."""
    where = "nisa.tensor_copy"
    _on_chip(dst, where, "dst")
    _on_chip(src, where, "src")
    _same_layout(dst, src, where, "dst", "src")
    eng = _engine_of(engine, globals()["engine"].vector)
    _no_gpsimd_psum(eng, where, dst, src)
    vals = _read2d(src)
    if vals.dtype == dst.dtype:
        _write(dst, vals, exact=True)
    else:
        _write(dst, dtypes.to_fp32(vals))
    return _count(eng, "tensor_copy", dst, all16=_is16(dst, src))


def memset(dst, value, engine=engine.unknown, name=None):
    """Fill ``dst`` with a compile-time constant."""
    where = "nisa.memset"
    _on_chip(dst, where, "dst")
    eng = _engine_of(engine, globals()["engine"].vector)
    _no_gpsimd_psum(eng, where, dst)
    if dst.dtype in dtypes.PACKED_DTYPES:
        check(
            value == 0,
            where,
            f"value={value!r} on {dst.dtype.names[0]}; x4 packed types take value=0 only (NKI 0.3.0 migration guide, "
            "'nisa.memset - x4 packed type restriction')",
        )
        vals = np.zeros(dst.shape, dtype=dst.dtype)
    elif dtypes.is_float(dst.dtype):
        vals = dtypes.convert(np.full(dst.shape, value, dtype=np.float32), dst.dtype)
    else:
        vals = np.full(dst.shape, int(value)).astype(dst.dtype)
    _write(dst, vals, exact=True)
    return _count(eng, "memset", dst, all16=_is16(dst))


def activation(
    dst, op, data, bias=None, scale=1.0, reduce_op=None, reduce_res=None, reduce_cmd=reduce_cmd.idle, name=None
):
    """Scalar Engine: ``dst = op(data * scale + bias)`` in float32, with the reduce-register semantics of the doc.

    ``reduce_cmd``: reset / reset_reduce zero the 128 per-lane registers; reduce / reset_reduce add the free-axis
    sum of the activated values; ``reduce_res`` receives the registers. With ``reduce_cmd=idle`` and both
    ``reduce_op`` and ``reduce_res`` given, the instruction behaves as ``activation_reduce`` (reset_reduce), which is
    how kernels written for NKI 0.2 use it (documented choice, docs/emulator.md).
    """
    where = "nisa.activation"
    _on_chip(dst, where, "dst")
    _on_chip(data, where, "data")
    _same_layout(dst, data, where, "dst", "data")
    check(
        isinstance(op, MathOp) and op.activation,
        where,
        f"op={op!r}; not in the activation function table (nki.api.shared.rst, 'Supported Activation Functions')",
    )
    rc = globals()["reduce_cmd"]
    sc = _scalar_or_vector(scale, data, where, "scale")
    b = np.float32(0.0) if bias is None else _scalar_or_vector(bias, data, where, "bias", require_fp32=False)
    x = _read32(data)
    with np.errstate(all="ignore"):
        y = op.fn((x * sc + b).astype(np.float32))
    _write(dst, y)
    cmd = reduce_cmd
    if reduce_op is not None or reduce_res is not None:
        check(reduce_op is OPS["add"], where, f"reduce_op={reduce_op!r}; must be nl.add (activation doc)")
        if cmd is rc.idle and reduce_res is not None:
            cmd = rc.reset_reduce
    p = data.shape[0]
    regs = context.current().act_regs
    if cmd in (rc.reset, rc.reset_reduce):
        regs[:p] = 0.0
    if cmd in (rc.reduce, rc.reset_reduce):
        check(reduce_op is not None, where, f"reduce_cmd={cmd.name} without reduce_op")
        regs[:p] += y.sum(axis=1, dtype=np.float32)
    check(cmd is not rc.load_reduce, where, "reduce_cmd=load_reduce; not supported by nisa.activation")
    instr = _count(globals()["engine"].scalar, "activation", data)
    if reduce_res is not None:
        _on_chip(reduce_res, where, "reduce_res")
        check(
            reduce_res.shape[0] == p and reduce_res.free_size == 1,
            where,
            f"reduce_res{list(reduce_res.shape)}; must be ({p}, 1)",
        )
        _write(reduce_res, regs[:p].reshape(p, 1))
        context.current().cost.compute("scalar", "activation_reduce_res", p, 0)
    return instr


def activation_reduce(dst, op, data, reduce_op, reduce_res, bias=None, scale=1.0, name=None):
    """``nisa.activation`` with ``reduce_cmd=reset_reduce`` and ``reduce_res`` (kept for compatibility)."""
    return activation(
        dst,
        op,
        data,
        bias=bias,
        scale=scale,
        reduce_op=reduce_op,
        reduce_res=reduce_res,
        reduce_cmd=reduce_cmd.reset_reduce,
    )


def tensor_tensor(dst, data1, data2, op, engine=engine.unknown, name=None):
    """Element-wise ``dst = data1 <op> data2`` (Vector, or GpSimd for ``nl.power`` / all-int32 operands)."""
    where = "nisa.tensor_tensor"
    for nm, t in (("dst", dst), ("data1", data1), ("data2", data2)):
        _on_chip(t, where, nm)
    _same_layout(dst, data1, where, "dst", "data1")
    _same_layout(dst, data2, where, "dst", "data2")
    _not_both_psum(data1, data2, where)
    op = _op(op, where, ("arith", "bitvec"))
    check(op.name != "bypass", where, "op=nl.bypass; not a tensor_tensor operator")
    eng_t = globals()["engine"]
    ints = all(t.dtype in (dtypes.int32, dtypes.uint32) for t in (dst, data1, data2))
    default = eng_t.gpsimd if (op.name == "power" or ints) else eng_t.vector
    if default is eng_t.gpsimd and any(t.buffer is MemoryRegion.psum for t in (dst, data1, data2)):
        check(op.name != "power", where, "op=nl.power runs on GpSimd, which cannot access PSUM")
        default = eng_t.vector
    eng = _engine_of(engine, default)
    _no_gpsimd_psum(eng, where, dst, data1, data2)
    if op.kind == "bitvec":
        for nm, t in (("dst", dst), ("data1", data1), ("data2", data2)):
            check(t.dtype in dtypes.INT_DTYPES, where, f"{nm} dtype={t.dtype.name}; bitvec ops need integer dtypes")
        res = op.fn(_read2d(data1).astype(np.int64), _read2d(data2).astype(np.int64))
        _write(dst, dtypes.convert(res, dst.dtype), exact=True)
    elif ints and eng is eng_t.gpsimd:
        res = op.fn(_read2d(data1).astype(np.int64), _read2d(data2).astype(np.int64))
        _write(dst, dtypes.convert(np.asarray(res).astype(np.int64), dst.dtype), exact=True)
    else:
        _write(dst, op.fn(_read32(data1), _read32(data2)))
    return _count(eng, "tensor_tensor", dst, all16=_is16(dst, data1, data2))


def _ts_apply(op: MathOp, x, operand, reverse: bool):
    if op.name == "bypass":
        return x
    if op.arity == 1:
        return op.fn(x)
    a, b = (operand, x) if reverse else (x, operand)
    return _apply_binary(op, a, b)


def tensor_scalar(
    dst, data, op0, operand0, reverse0=False, op1=None, operand1=None, reverse1=False, engine=engine.unknown, name=None
):
    """``dst = (data <op0> operand0) <op1> operand1`` with scalar or [P, 1] operands broadcast along the free axis."""
    where = "nisa.tensor_scalar"
    _on_chip(dst, where, "dst")
    _on_chip(data, where, "data")
    _same_layout(dst, data, where, "dst", "data")
    eng_t = globals()["engine"]
    op0 = _op(op0, where, ("arith", "bitvec", "unary"), "op0")
    ops = [(op0, operand0, reverse0)]
    if op1 is not None:
        op1 = _op(op1, where, ("arith", "bitvec", "unary"), "op1")
        check(
            (op0.kind == "bitvec") == (op1.kind == "bitvec"),
            where,
            f"op0={op0!r}, op1={op1!r}; both must be bitvec or both arithmetic",
        )
        ops.append((op1, operand1, reverse1))
    else:
        check(operand1 is None, where, "operand1 given without op1; must be None when unused")
    eng = _engine_of(engine, eng_t.vector)
    _no_gpsimd_psum(eng, where, dst, data)
    if eng is eng_t.scalar:
        combo = (op0.name, None if op1 is None else op1.name)
        check(
            combo in (("multiply", "add"), ("multiply", None), ("add", None)),
            where,
            f"ops={combo} on the Scalar Engine; trn2 supports (multiply, add), (multiply,), (add,) only",
        )
    bitvec = op0.kind == "bitvec"
    if bitvec:
        check(eng is eng_t.vector, where, f"engine={eng.name}; bitvec operators run on the Vector Engine only")
        for nm, t in (("dst", dst), ("data", data)):
            check(t.dtype in dtypes.INT_DTYPES, where, f"{nm} dtype={t.dtype.name}; bitvec ops need integer dtypes")
        x = _read2d(data).astype(np.int64)
    else:
        x = _read32(data)
    for i, (op, operand, rev) in enumerate(ops):
        if op.arity == 1:
            check(
                operand is None or (not isinstance(operand, NkiTensor) and float(operand) == 0.0),
                where,
                f"operand{i}={operand!r}; must be None or 0 for the unary operator {op!r}",
            )
            x = op.fn(x)
            continue
        if bitvec:
            check(
                not isinstance(operand, NkiTensor) or operand.dtype in dtypes.INT_DTYPES,
                where,
                f"operand{i}; bitvec operands must be integers",
            )
            v = _read2d(operand).astype(np.int64) if isinstance(operand, NkiTensor) else np.int64(int(operand))
            x = _ts_apply(op, x, v, rev)
        else:
            v = _scalar_or_vector(operand, data, where, f"operand{i}")
            x = _ts_apply(op, x, v, rev)
    if bitvec:
        _write(dst, dtypes.convert(np.asarray(x), dst.dtype), exact=True)
    else:
        _write(dst, np.asarray(x, dtype=np.float32))
    return _count(eng, "tensor_scalar", dst, all16=_is16(dst, data))


def scalar_tensor_tensor(dst, data, op0, operand0, op1, operand1, reverse0=False, reverse1=False, name=None):
    """Vector Engine: ``dst = (data <op0> operand0) <op1> operand1`` with operand1 a full tile."""
    where = "nisa.scalar_tensor_tensor"
    for nm, t in (("dst", dst), ("data", data), ("operand1", operand1)):
        _on_chip(t, where, nm)
    _same_layout(dst, data, where, "dst", "data")
    _same_layout(dst, operand1, where, "dst", "operand1")
    _not_both_psum(data, operand1, where)
    op0 = _op(op0, where, ("arith",), "op0")
    op1 = _op(op1, where, ("arith",), "op1")
    v0 = _scalar_or_vector(operand0, data, where, "operand0", require_fp32=False)
    tmp = _ts_apply(op0, _read32(data), v0, reverse0)
    _write(dst, _ts_apply(op1, tmp, _read32(operand1), reverse1))
    return _count(globals()["engine"].vector, "scalar_tensor_tensor", dst, all16=_is16(dst, data, operand1))


def _norm_axes(axis, t: NkiTensor, where: str) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    axes = tuple(sorted(int(a) % t.ndim for a in axes))
    check(len(axes) >= 1 and 0 not in axes, where, f"axis={axis}; the partition axis 0 cannot be reduced")
    check(
        axes == tuple(range(t.ndim - len(axes), t.ndim)),
        where,
        f"axis={axis}; must be the last contiguous free dims ending at dim {t.ndim - 1}",
    )
    return axes


def tensor_reduce(dst, op, data, axis, negate=False, keepdims=False, name=None):
    """Vector Engine reduction over the last free axes, float32 math (bit patterns for bitvec ops)."""
    where = "nisa.tensor_reduce"
    _on_chip(dst, where, "dst")
    _on_chip(data, where, "data")
    op = _op(op, where, ("arith", "bitvec"))
    check(op.reducible, where, f"op={op!r}; not a legal reduction operator (nki.api.shared.rst)")
    axes = _norm_axes(axis, data, where)
    kept = math.prod(data.shape[1 : data.ndim - len(axes)])
    check(
        dst.shape[0] == data.shape[0] and dst.free_size == kept,
        where,
        f"dst{list(dst.shape)}; must have {data.shape[0]} partitions and {kept} elements each for axis={axis}",
    )
    raw = data.read_raw()
    if data.buffer is MemoryRegion.psum:
        _read2d(data)
    if op.kind == "bitvec":
        res = op.reduce(raw.astype(np.int64), axes)
        _write(dst, dtypes.convert(res, dst.dtype), exact=True)
    else:
        res = op.reduce(dtypes.to_fp32(raw), axes).astype(np.float32)
        if negate:
            res = -res
        _write(dst, res)
    return _count(globals()["engine"].vector, "tensor_reduce", data, all16=_is16(data))


def tensor_partition_reduce(dst, op, data, name=None):
    """GpSimd reduction across partitions: ``dst[1, F] = op over p of data[p, F]``."""
    where = "nisa.tensor_partition_reduce"
    _on_chip(dst, where, "dst", allow_psum=False)
    _on_chip(data, where, "data", allow_psum=False)
    op = _op(op, where, ("arith", "bitvec"))
    check(op.name in ("add", "maximum", "bitwise_or", "bitwise_and"), where, f"op={op!r}; add/max/or/and only")
    check(
        dst.shape[0] == 1 and dst.free_size == data.free_size,
        where,
        f"dst{list(dst.shape)}; must be [1, {data.free_size}]",
    )
    x = _read32(data) if op.kind != "bitvec" else _read2d(data).astype(np.int64)
    res = op.reduce(x, 0).reshape(1, -1)
    _write(dst, res if op.kind != "bitvec" else dtypes.convert(res, dst.dtype), exact=op.kind == "bitvec")
    return _count(globals()["engine"].gpsimd, "tensor_partition_reduce", data)


def tensor_scalar_reduce(
    dst,
    data,
    op0,
    operand0,
    reduce_op,
    reduce_res=None,
    reverse0=False,
    reduce_cmd=reduce_cmd.reset_reduce,
    reduce_init=None,
    reduce_res_negate=False,
    name=None,
):
    """Vector Engine: ``dst = data <op0> operand0`` plus a free-axis reduction into the accumulator registers."""
    where = "nisa.tensor_scalar_reduce"
    _on_chip(dst, where, "dst")
    _on_chip(data, where, "data")
    _same_layout(dst, data, where, "dst", "data")
    op0 = _op(op0, where, ("arith", "unary"), "op0")
    reduce_op = _op(reduce_op, where, ("arith",), "reduce_op")
    check(reduce_op.reducible, where, f"reduce_op={reduce_op!r}; not a legal reduction operator")
    v = _scalar_or_vector(operand0, data, where, "operand0") if op0.arity == 2 else None
    y = np.asarray(_ts_apply(op0, _read32(data), v, reverse0), dtype=np.float32)
    _write(dst, y)
    p = data.shape[0]
    regs = context.current().vec_regs
    rc = globals()["reduce_cmd"]
    part = reduce_op.reduce(y, 1).astype(np.float32)
    if reduce_cmd is rc.reset_reduce:
        regs[:p] = part
    elif reduce_cmd is rc.load_reduce:
        init = _scalar_or_vector(reduce_init, data, where, "reduce_init")
        regs[:p] = reduce_op.fn(np.broadcast_to(init, (p, 1)).reshape(p), part)
    elif reduce_cmd is rc.reduce:
        regs[:p] = reduce_op.fn(regs[:p], part)
    elif reduce_cmd is rc.reset:
        regs[:p] = np.float32(reduce_op.identity if reduce_op.identity is not None else 0.0)
    if reduce_res is not None:
        _on_chip(reduce_res, where, "reduce_res")
        check(
            reduce_res.shape[0] == p and reduce_res.free_size == 1,
            where,
            f"reduce_res{list(reduce_res.shape)}; must be ({p}, 1)",
        )
        out = regs[:p].reshape(p, 1)
        _write(reduce_res, -out if reduce_res_negate else out)
    return _count(globals()["engine"].vector, "tensor_scalar_reduce", dst, all16=_is16(dst, data))


def reciprocal(dst, data, name=None):
    """Vector Engine ``1 / x`` in float32 (8x the cost of a plain vector op, nki.api.shared.rst)."""
    where = "nisa.reciprocal"
    _on_chip(dst, where, "dst")
    _on_chip(data, where, "data")
    _same_layout(dst, data, where, "dst", "data")
    with np.errstate(all="ignore"):
        _write(dst, (np.float32(1.0) / _read32(data)).astype(np.float32))
    return _count(globals()["engine"].vector, "reciprocal", dst, factor=cost.VECTOR_RECIPROCAL_SLOWDOWN)


def _pattern_values(pattern, offset: int, channel_multiplier: int, p: int, free: int, where: str) -> np.ndarray:
    pattern = [[int(s), int(n)] for s, n in pattern]
    check(1 <= len(pattern) <= ISA_PATTERN_MAX_DIMS, where, f"pattern={pattern}; 1 to 4 [step, num] pairs")
    total = math.prod(n for _, n in pattern)
    check(total == free, where, f"pattern={pattern} has {total} elements; dst has {free} per partition")
    vals = np.zeros([n for _, n in pattern], dtype=np.int64)
    for d, (step, n) in enumerate(pattern):
        shp = [1] * len(pattern)
        shp[d] = n
        vals = vals + (np.arange(n, dtype=np.int64) * step).reshape(shp)
    chan = np.arange(p, dtype=np.int64).reshape(p, 1) * int(channel_multiplier)
    return (int(offset) + chan + vals.reshape(1, -1)).astype(np.int64)


def iota(dst, pattern, offset=0, channel_multiplier=0, name=None):
    """GpSimd: ``dst[c, ...] = offset + c * channel_multiplier + sum(i_k * step_k)`` in int32, cast to dst."""
    where = "nisa.iota"
    _on_chip(dst, where, "dst", allow_psum=False)
    vals = _pattern_values(pattern, offset, channel_multiplier, dst.shape[0], dst.free_size, where)
    _write(dst, dtypes.convert(vals.astype(np.int32), dst.dtype), exact=True)
    return _count(globals()["engine"].gpsimd, "iota", dst)


def affine_select(
    dst, pattern, channel_multiplier, on_true_tile, on_false_value, cmp_op=OPS["equal"], offset=0, name=None
):
    """GpSimd: ``dst = on_true_tile`` where ``cmp_op(affine, 0)``, else ``on_false_value`` (causal masks)."""
    where = "nisa.affine_select"
    _on_chip(dst, where, "dst", allow_psum=False)
    _on_chip(on_true_tile, where, "on_true_tile", allow_psum=False)
    _same_layout(dst, on_true_tile, where, "dst", "on_true_tile")
    cmp_op = _op(cmp_op, where, ("arith",), "cmp_op")
    aff = _pattern_values(pattern, offset, channel_multiplier, dst.shape[0], dst.free_size, where)
    pred = cmp_op.fn(aff.astype(np.float64), 0.0) != 0
    x = _read32(on_true_tile)
    _write(dst, np.where(pred, x, np.float32(on_false_value)).astype(np.float32))
    return _count(globals()["engine"].gpsimd, "affine_select", dst)


def _topk_src(src: NkiTensor, where: str, name: str) -> np.ndarray:
    _on_chip(src, where, name)
    check(src.ndim <= 3, where, f"{name}{list(src.shape)}; at most 3-D")
    n = src.free_size
    check(
        TOPK8_MIN_ELEMS <= n <= TOPK8_MAX_ELEMS,
        where,
        f"{name}{list(src.shape)} has {n} elements per partition; must be {TOPK8_MIN_ELEMS}..{TOPK8_MAX_ELEMS}",
    )
    return _read32(src)


def max8(dst, src, name=None):
    """Vector Engine: the 8 largest values of each partition, descending."""
    where = "nisa.max8"
    x = _topk_src(src, where, "src")
    _on_chip(dst, where, "dst")
    check(
        dst.ndim == 2 and dst.shape == (src.shape[0], TOPK8),
        where,
        f"dst{list(dst.shape)}; must be [{src.shape[0]}, {TOPK8}]",
    )
    top = -np.sort(-x, axis=1)[:, :TOPK8]
    _write(dst, top)
    return _count(globals()["engine"].vector, "max8", src, all16=_is16(src))


def nc_find_index8(dst, data, vals, name=None):
    """Vector Engine: index of the first occurrence of each of 8 values per partition (duplicates get successive
    occurrences in ascending order); missing values give the all-ones sentinel."""
    where = "nisa.nc_find_index8"
    x = _topk_src(data, where, "data")
    _on_chip(vals, where, "vals")
    _on_chip(dst, where, "dst")
    p = data.shape[0]
    check(vals.shape[0] == p and vals.free_size == TOPK8, where, f"vals{list(vals.shape)}; must have 8 per partition")
    check(dst.ndim == 2 and dst.shape == (p, TOPK8), where, f"dst{list(dst.shape)}; must be [{p}, {TOPK8}]")
    check(dst.dtype in (dtypes.uint16, dtypes.uint32), where, f"dst dtype={dst.dtype.name}; must be uint16 or uint32")
    v = _read32(vals)
    eq = x[:, None, :] == v[:, :, None]  # [P, 8, F]
    earlier = np.tril(np.ones((TOPK8, TOPK8), dtype=bool), -1)
    rank = ((v[:, :, None] == v[:, None, :]) & earlier[None]).sum(axis=2)  # occurrence wanted per slot
    hit = eq & (np.cumsum(eq, axis=2, dtype=np.int32) == (rank + 1)[:, :, None])
    found = hit.any(axis=2)
    idx = hit.argmax(axis=2).astype(np.int64)
    sentinel = np.iinfo(dst.dtype).max
    _write(dst, np.where(found, idx, sentinel).astype(dst.dtype), exact=True)
    return _count(globals()["engine"].vector, "nc_find_index8", data, all16=_is16(data))


def nc_match_replace8(dst, data, vals, imm, dst_idx=None, name=None):
    """Vector Engine: replace the first occurrence of each of 8 values with ``imm``; optional indices (reverse
    pairing of duplicates, as documented)."""
    where = "nisa.nc_match_replace8"
    x = _topk_src(data, where, "data")
    _on_chip(vals, where, "vals")
    _on_chip(dst, where, "dst")
    _same_layout(dst, data, where, "dst", "data")
    p, f = x.shape
    v = _read32(vals)
    check(v.shape == (p, TOPK8), where, f"vals{list(vals.shape)}; must have 8 per partition")
    out = x.copy()
    idx = np.full((p, TOPK8), -1, dtype=np.int64)
    rows = np.arange(p)
    for j in range(TOPK8 - 1, -1, -1):  # 8 vectorised steps over all partitions, in the documented reverse order
        m = out == v[:, j : j + 1]
        ok = m.any(axis=1)
        pos = m.argmax(axis=1)
        out[rows[ok], pos[ok]] = np.float32(imm)
        idx[ok, j] = pos[ok]
    _write(dst, out)
    if dst_idx is not None:
        _on_chip(dst_idx, where, "dst_idx")
        _write(dst_idx, dtypes.convert(np.where(idx < 0, np.iinfo(np.uint32).max, idx), dst_idx.dtype), exact=True)
    return _count(globals()["engine"].vector, "nc_match_replace8", data, all16=_is16(data))


def select_reduce(
    dst,
    predicate,
    on_true,
    on_false,
    reduce_res=None,
    reduce_cmd=reduce_cmd.idle,
    reduce_op=OPS["maximum"],
    reverse_pred=False,
    name=None,
):
    """Vector Engine: ``dst = predicate ? on_true : on_false`` with an optional free-axis reduction."""
    where = "nisa.select_reduce"
    for nm, t in (("dst", dst), ("predicate", predicate), ("on_true", on_true)):
        _on_chip(t, where, nm)
    _same_layout(dst, on_true, where, "dst", "on_true")
    _same_layout(dst, predicate, where, "dst", "predicate")
    pred = _read2d(predicate) != 0
    if reverse_pred:
        pred = ~pred
    if isinstance(on_false, NkiTensor):
        _same_layout(dst, on_false, where, "dst", "on_false")
        f = _read32(on_false)
    else:
        f = np.float32(on_false)
    y = np.where(pred, _read32(on_true), f).astype(np.float32)
    _write(dst, y)
    p = dst.shape[0]
    regs = context.current().vec_regs
    rc = globals()["reduce_cmd"]
    reduce_op = _op(reduce_op, where, ("arith",), "reduce_op")
    part = reduce_op.reduce(y, 1).astype(np.float32)
    if reduce_cmd in (rc.reset_reduce,) or (reduce_cmd is rc.idle and reduce_res is not None):
        regs[:p] = part
    elif reduce_cmd is rc.reduce:
        regs[:p] = reduce_op.fn(regs[:p], part)
    if reduce_res is not None:
        _on_chip(reduce_res, where, "reduce_res")
        _write(reduce_res, regs[:p].reshape(p, 1))
    return _count(globals()["engine"].vector, "select_reduce", dst)


# ----- registers and dynamic control flow ------------------------------------------------------------------------
def register_alloc(x=None) -> VirtualRegister:
    return VirtualRegister(x)


def _writable(reg, where: str) -> None:
    check(
        not getattr(reg, "frozen", False),
        where,
        "dst is a loop induction variable; it is read-only (nki-language-guide.rst; NKI 0.4 release notes: writes "
        "raise at trace time)",
    )


def register_move(dst: VirtualRegister, src) -> None:
    _writable(dst, "nisa.register_move")
    dst.value = int(src.value if isinstance(src, VirtualRegister) else src)


def register_load(dst: VirtualRegister, src) -> None:
    _writable(dst, "nisa.register_load")
    check(isinstance(src, NkiTensor) and src.size == 1, "nisa.register_load", f"src={src!r}; must be a 1x1 tile")
    dst.value = (
        int(dtypes.to_fp32(src.read_raw()).reshape(-1)[0])
        if dtypes.is_float(src.dtype)
        else int(src.read_raw().reshape(-1)[0])
    )


def register_store(dst, src) -> None:
    check(isinstance(dst, NkiTensor) and dst.size == 1, "nisa.register_store", f"dst={dst!r}; must be a 1x1 tile")
    dst.write_raw(
        dtypes.convert(np.array([[int(src.value if isinstance(src, VirtualRegister) else src)]]), dst.dtype).reshape(
            dst.shape
        )
    )


# ----- predicated copy, scans, cross-partition movement, gathers, statistics --------------------------------------
FP32_MIN = float(np.finfo(np.float32).min)  # range_select's only legal on_false_value (-3.4028235e+38, isa doc)
_COMPARE_OPS = ("equal", "less", "less_equal", "greater", "greater_equal")  # range_select comp_op0/comp_op1 (doc)
GPSIMD_PARTITIONS_PER_CORE = 16  # each of the 8 GpSimd cores reaches 16 partitions (local_gather doc)
LOCAL_GATHER_ELEMS = (1, 2, 4, 8, 16, 32)  # local_gather num_elem_per_idx (doc, constraint 2)
LOCAL_GATHER_MAX_INDICES = 4096  # indices per GpSimd core (local_gather doc, constraint 3)
SHUFFLE_QUADRANT = 32  # nc_stream_shuffle works within quadrants of 32 partitions (doc)
SHUFFLE_KEEP = 255  # shuffle_mask value: leave the output partition unmodified (doc)
BN_STATS_FMAX = 512  # bn_stats: elements per partition (doc; nl.tile_size.bn_stats_fmax)
SENDRECV_GPSIMD_BYTES = {4: 1024, 2: 512, 1: 256}  # sendrecv gpsimd_dma: bytes per partition by element size (doc)


def _start_partition(t: NkiTensor) -> int:
    """First partition a view of an on-chip tensor accesses."""
    return t.offset // t.strides[0] if t.strides and t.strides[0] > 0 else 0


def tensor_copy_predicated(dst, src, predicate, reverse_pred=False, name=None):
    """Vector Engine: ``dst = src`` where ``predicate`` is non-zero (zero with ``reverse_pred``); elsewhere ``dst`` is
    unmodified (isa doc ``tensor_copy_predicated``: same partitions and elements; predicate uint8/16/32; src and dst
    share a dtype; src and predicate not both in PSUM)."""
    where = "nisa.tensor_copy_predicated"
    _on_chip(dst, where, "dst")
    _on_chip(predicate, where, "predicate")
    _same_layout(dst, predicate, where, "dst", "predicate")
    check(
        predicate.dtype in (dtypes.uint8, dtypes.uint16, dtypes.uint32),
        where,
        f"predicate dtype={predicate.dtype.name}; must be uint8, uint16 or uint32 (tensor_copy_predicated doc)",
    )
    pred = _read2d(predicate) != 0
    if reverse_pred:
        pred = ~pred
    if isinstance(src, NkiTensor):
        _on_chip(src, where, "src")
        _same_layout(dst, src, where, "dst", "src")
        _not_both_psum(src, predicate, where)
        check(
            src.dtype == dst.dtype,
            where,
            f"src dtype={src.dtype.name}, dst dtype={dst.dtype.name}; must be equal (tensor_copy_predicated doc)",
        )
        vals = _read2d(src)
    else:
        check(isinstance(src, (int, float, np.integer, np.floating)), where, f"src={src!r}; must be a tile or number")
        vals = dtypes.convert(np.full(pred.shape, src, dtype=np.float32), dst.dtype)
    old = dst.read_raw().reshape(pred.shape)
    _write(dst, np.where(pred, vals, old), exact=True)
    return _count(globals()["engine"].vector, "tensor_copy_predicated", dst, all16=_is16(dst))


def tensor_tensor_scan(dst, data0, data1, initial, op0, op1, reverse0=False, reverse1=False, name=None):
    """Vector Engine scan along the free axis: ``r[i] = op1(op0(data0[i], r[i-1]), data1[i])``, ``r[-1] = initial``
    (isa doc ``tensor_tensor_scan``; fp32 math, reverse0/1 swap the operands of op0/op1)."""
    where = "nisa.tensor_tensor_scan"
    for nm, t in (("dst", dst), ("data0", data0), ("data1", data1)):
        _on_chip(t, where, nm)
    _same_layout(dst, data0, where, "dst", "data0")
    _same_layout(dst, data1, where, "dst", "data1")
    _not_both_psum(data0, data1, where)
    op0 = _op(op0, where, ("arith",), "op0")
    op1 = _op(op1, where, ("arith",), "op1")
    a, b = _read32(data0), _read32(data1)
    prev = np.broadcast_to(
        np.asarray(_scalar_or_vector(initial, data0, where, "initial", require_fp32=False), dtype=np.float32),
        (a.shape[0], 1),
    ).reshape(-1)
    out = np.empty_like(a)
    with np.errstate(all="ignore"):
        for i in range(a.shape[1]):
            x = op0.fn(prev, a[:, i]) if reverse0 else op0.fn(a[:, i], prev)
            x = op1.fn(b[:, i], x) if reverse1 else op1.fn(x, b[:, i])
            prev = np.asarray(x, dtype=np.float32)
            out[:, i] = prev
    _write(dst, out)
    return _count(globals()["engine"].vector, "tensor_tensor_scan", dst, all16=_is16(dst, data0, data1))


def nc_stream_shuffle(dst, src, shuffle_mask, name=None):
    """Vector Engine: within every quadrant of 32 partitions, output partition i copies input partition
    ``shuffle_mask[i]`` (255: unmodified) (isa doc ``nc_stream_shuffle``: same dtype and elements per partition; start
    partitions 0 for 96/128 active partitions, 0/64 for 64, a multiple of 32 for 32)."""
    where = "nisa.nc_stream_shuffle"
    _on_chip(dst, where, "dst")
    _on_chip(src, where, "src")
    check(src.dtype == dst.dtype, where, f"src dtype={src.dtype.name}, dst dtype={dst.dtype.name}; must be equal")
    check(
        src.free_size == dst.free_size,
        where,
        f"src{list(src.shape)} vs dst{list(dst.shape)}; must have the same number of elements per partition",
    )
    mask = [int(m) for m in shuffle_mask]
    check(len(mask) == SHUFFLE_QUADRANT, where, f"shuffle_mask has {len(mask)} entries; must have {SHUFFLE_QUADRANT}")
    active = -(-max(src.shape[0], dst.shape[0]) // SHUFFLE_QUADRANT) * SHUFFLE_QUADRANT
    allowed = {128: (0,), 96: (0,), 64: (0, 64), 32: (0, 32, 64, 96)}[active]
    for nm, t in (("src", src), ("dst", dst)):
        sp = _start_partition(t)
        check(
            sp in allowed,
            where,
            f"{nm} start partition={sp} with {active} active partitions; must be one of {allowed} "
            "(nc_stream_shuffle doc)",
        )
    for i, m in enumerate(mask):
        check(
            m == SHUFFLE_KEEP or 0 <= m < SHUFFLE_QUADRANT,
            where,
            f"shuffle_mask[{i}]={m}; must be a partition in [0, 32) of the quadrant or 255 (keep)",
        )
    x = _read2d(src)
    out = dst.read_raw().reshape(dst.shape[0], -1).copy()
    for q in range(0, active, SHUFFLE_QUADRANT):
        for i, m in enumerate(mask):
            p, sp = q + i, q + m
            if m == SHUFFLE_KEEP or p >= out.shape[0]:
                continue
            check(sp < x.shape[0], where, f"shuffle_mask[{i}]={m}: source partition {sp} beyond src{list(src.shape)}")
            out[p] = x[sp]
    _write(dst, out, exact=True)
    return _count(globals()["engine"].vector, "nc_stream_shuffle", dst, all16=_is16(dst))


def local_gather(dst, src_buffer, index, num_elem_per_idx=1, num_valid_indices=None, name=None):
    """GpSimd: each core (16 partitions) flattens its ``index`` slice partition-first and, in every one of its
    partitions, gathers ``num_elem_per_idx`` contiguous elements starting at each index (an element offset into the
    partition's flattened free dims) (isa doc ``local_gather`` and its NumPy reference,
    ``aws-neuron-sdk:nki/test/test_nki_isa_local_gather.py``)."""
    where = "nisa.local_gather"
    for nm, t in (("dst", dst), ("src_buffer", src_buffer), ("index", index)):
        _on_chip(t, where, nm, allow_psum=False)
    p = src_buffer.shape[0]
    check(
        index.shape[0] == p and p % GPSIMD_PARTITIONS_PER_CORE == 0,
        where,
        f"src_buffer partitions={p}, index partitions={index.shape[0]}; must be equal and a multiple of 16 (doc #1)",
    )
    n = int(num_elem_per_idx)
    check(n in LOCAL_GATHER_ELEMS, where, f"num_elem_per_idx={n}; must be one of {LOCAL_GATHER_ELEMS} (doc #2)")
    check(index.dtype == dtypes.uint16, where, f"index dtype={index.dtype.name}; must be uint16 (local_gather doc)")
    check(dst.dtype == src_buffer.dtype, where, f"dst dtype={dst.dtype.name}; must equal src {src_buffer.dtype.name}")
    per_core = GPSIMD_PARTITIONS_PER_CORE * index.free_size
    valid = per_core if num_valid_indices is None else int(num_valid_indices)
    check(
        0 < valid <= per_core and valid <= LOCAL_GATHER_MAX_INDICES,
        where,
        f"num_valid_indices={valid}; must be in 1..min({per_core} indices per core, {LOCAL_GATHER_MAX_INDICES}) "
        "(doc #3)",
    )
    check(
        dst.shape[0] == p and dst.free_size == valid * n,
        where,
        f"dst{list(dst.shape)}; must be [{p}, {valid} x {n} elements]",
    )
    data = _read2d(src_buffer)
    idx = _read2d(index).astype(np.int64)
    out = np.empty((p, valid * n), dtype=data.dtype)
    cols = np.arange(n, dtype=np.int64)
    for c in range(0, p, GPSIMD_PARTITIONS_PER_CORE):
        flat = idx[c : c + GPSIMD_PARTITIONS_PER_CORE].flatten(order="F")[:valid]
        pos = (flat[:, None] + cols[None, :]).reshape(-1)
        check(
            np.all((pos >= 0) & (pos < data.shape[1])),
            where,
            f"index out of range for core {c // GPSIMD_PARTITIONS_PER_CORE}: elements must be < {data.shape[1]} "
            "(out-of-bound access is undefined behaviour)",
        )
        out[c : c + GPSIMD_PARTITIONS_PER_CORE] = data[c : c + GPSIMD_PARTITIONS_PER_CORE][:, pos]
    _write(dst, out, exact=True)
    return _count(globals()["engine"].gpsimd, "local_gather", dst)


def nc_n_gather(dst, data, indices, name=None):
    """GpSimd: ``dst[p, j] = data[p].flatten()[indices[p, j]]`` within each partition (isa doc ``nc_n_gather``: SBUF
    only, dst dtype = data dtype, uint32 indices in range)."""
    where = "nisa.nc_n_gather"
    for nm, t in (("dst", dst), ("data", data), ("indices", indices)):
        _on_chip(t, where, nm, allow_psum=False)
    check(
        dst.shape[0] == data.shape[0] == indices.shape[0],
        where,
        f"partitions dst={dst.shape[0]}, data={data.shape[0]}, indices={indices.shape[0]}; must be equal",
    )
    check(
        indices.dtype == dtypes.uint32, where, f"indices dtype={indices.dtype.name}; must be uint32 (nc_n_gather doc)"
    )
    check(dst.dtype == data.dtype, where, f"dst dtype={dst.dtype.name}; must equal data dtype {data.dtype.name}")
    check(
        dst.free_size == indices.free_size,
        where,
        f"dst{list(dst.shape)} vs indices{list(indices.shape)}; must have the same elements per partition",
    )
    x = _read2d(data)
    idx = _read2d(indices).astype(np.int64)
    check(
        np.all(idx < x.shape[1]),
        where,
        f"indices max={int(idx.max())}; must be in [0, {x.shape[1]}) (data elements per partition, nc_n_gather doc)",
    )
    _write(dst, np.take_along_axis(x, idx, axis=1), exact=True)
    return _count(globals()["engine"].gpsimd, "nc_n_gather", dst)


def bn_stats(dst, data, name=None):
    """Vector Engine: per partition (count, mean, variance x count) of the even and of the odd elements, 6 values
    (isa doc ``bn_stats``; at most 512 elements per partition; fp32 math)."""
    where = "nisa.bn_stats"
    _on_chip(dst, where, "dst")
    _on_chip(data, where, "data")
    f = data.free_size
    check(f <= BN_STATS_FMAX, where, f"data{list(data.shape)} has {f} elements per partition; must be <= 512")
    check(dst.shape[0] == data.shape[0] and dst.free_size == 6, where, f"dst{list(dst.shape)}; must be [P, 6]")
    x = _read32(data).astype(np.float64)
    out = np.zeros((x.shape[0], 6), dtype=np.float64)
    for k, part in enumerate((x[:, 0::2], x[:, 1::2])):
        c = part.shape[1]
        if c:
            m = part.mean(axis=1)
            out[:, 3 * k] = c
            out[:, 3 * k + 1] = m
            out[:, 3 * k + 2] = ((part - m[:, None]) ** 2).sum(axis=1)
    _write(dst, out.astype(np.float32))
    return _count(globals()["engine"].vector, "bn_stats", data, all16=_is16(data))


def bn_aggr(dst, data, name=None):
    """Vector Engine: mean and (population) variance per partition from ``bn_stats`` triples (isa doc ``bn_aggr``:
    elements per partition a multiple of 3)."""
    where = "nisa.bn_aggr"
    _on_chip(dst, where, "dst")
    _on_chip(data, where, "data")
    check(data.free_size % 3 == 0, where, f"data{list(data.shape)}: {data.free_size} elements; must be a multiple of 3")
    check(dst.shape[0] == data.shape[0] and dst.free_size == 2, where, f"dst{list(dst.shape)}; must be [P, 2]")
    t = _read32(data).astype(np.float64).reshape(data.shape[0], -1, 3)
    c, m, m2 = t[..., 0], t[..., 1], t[..., 2]
    n = c.sum(axis=1)
    with np.errstate(all="ignore"):
        mean = (c * m).sum(axis=1) / n
        var = (m2 + c * (m - mean[:, None]) ** 2).sum(axis=1) / n
    _write(dst, np.stack([mean, var], axis=1).astype(np.float32))
    return _count(globals()["engine"].vector, "bn_aggr", data)


def range_select(
    dst,
    on_true_tile,
    comp_op0,
    comp_op1,
    bound0,
    bound1,
    reduce_cmd=reduce_cmd.reset_reduce,
    reduce_res=None,
    reduce_op=OPS["maximum"],
    range_start=0,
    on_false_value=FP32_MIN,
    name=None,
):
    """Vector Engine: keep elements whose free index + ``range_start`` satisfies both comparisons with the per-partition
    bounds, else ``on_false_value`` (FP32_MIN); max-reduce into the accumulator registers (isa doc ``range_select``)."""
    where = "nisa.range_select"
    _on_chip(dst, where, "dst")
    _on_chip(on_true_tile, where, "on_true_tile")
    _same_layout(dst, on_true_tile, where, "dst", "on_true_tile")
    check(dtypes.is_float(on_true_tile.dtype), where, f"on_true_tile dtype={on_true_tile.dtype.name}; must be float")
    for nm, op in (("comp_op0", comp_op0), ("comp_op1", comp_op1)):
        check(
            isinstance(op, MathOp) and op.name in _COMPARE_OPS,
            where,
            f"{nm}={op!r}; must be one of nl.{', nl.'.join(_COMPARE_OPS)} (range_select doc)",
        )
    check(reduce_op is OPS["maximum"], where, f"reduce_op={reduce_op!r}; only nl.maximum is supported (doc)")
    check(
        np.float32(on_false_value) == np.float32(FP32_MIN),
        where,
        f"on_false_value={on_false_value!r}; must be FP32_MIN ({FP32_MIN:.7e}) (range_select doc)",
    )
    p = dst.shape[0]
    bounds = []
    for nm, b in (("bound0", bound0), ("bound1", bound1)):
        _tensor(b, where, nm)
        _on_chip(b, where, nm)
        check(b.shape[0] == p and b.free_size == 1, where, f"{nm}{list(b.shape)}; must be ({p}, 1)")
        check(b.dtype == dtypes.float32, where, f"{nm} dtype={b.dtype.name}; must be float32 (range_select doc)")
        bounds.append(_read32(b))
    idx = (np.float32(int(range_start)) + np.arange(dst.free_size, dtype=np.float32))[None, :]
    mask = (comp_op0.fn(idx, bounds[0]) != 0) & (comp_op1.fn(idx, bounds[1]) != 0)
    y = np.where(mask, _read32(on_true_tile), np.float32(FP32_MIN)).astype(np.float32)
    _write(dst, y)
    _vector_accumulate(reduce_op, y, reduce_cmd, reduce_res, p, where)
    return _count(globals()["engine"].vector, "range_select", dst, all16=_is16(dst, on_true_tile))


def _vector_accumulate(reduce_op: MathOp, y: np.ndarray, cmd, reduce_res, p: int, where: str) -> None:
    """Vector Engine accumulator registers: reset / reduce / reset_reduce with the free-axis reduction of ``y``."""
    regs = context.current().vec_regs
    rc = globals()["reduce_cmd"]
    part = reduce_op.reduce(y, 1).astype(np.float32)
    if cmd is rc.reset_reduce:
        regs[:p] = part
    elif cmd is rc.reduce:
        regs[:p] = reduce_op.fn(regs[:p], part)
    elif cmd is rc.reset:
        regs[:p] = np.float32(reduce_op.identity if reduce_op.identity is not None else 0.0)
    if reduce_res is not None:
        _on_chip(reduce_res, where, "reduce_res")
        check(
            reduce_res.shape[0] == p and reduce_res.free_size == 1,
            where,
            f"reduce_res{list(reduce_res.shape)}; must be ({p}, 1)",
        )
        _write(reduce_res, regs[:p].reshape(p, 1))


def nonzero_with_count(dst, src, index_offset=0, padding_val=-1, name=None):
    """GpSimd: on partitions 0, 16, ..., 112 only, the indices (+ ``index_offset``) of the non-zero elements, then
    ``padding_val``, then the count in the extra last element (isa doc ``nonzero_with_count``)."""
    where = "nisa.nonzero_with_count"
    _on_chip(dst, where, "dst", allow_psum=False)
    _on_chip(src, where, "src", allow_psum=False)
    check(src.dtype in (dtypes.float32, dtypes.int32), where, f"src dtype={src.dtype.name}; must be float32 or int32")
    check(dst.dtype == dtypes.int32, where, f"dst dtype={dst.dtype.name}; must be int32 (nonzero_with_count doc)")
    check(dst.shape[0] == src.shape[0], where, f"dst partitions={dst.shape[0]}; must equal src's {src.shape[0]}")
    f = src.free_size
    check(dst.free_size == f + 1, where, f"dst{list(dst.shape)}; must have src's {f} elements + 1 per partition")
    x = _read2d(src)
    out = dst.read_raw().reshape(dst.shape[0], -1).copy()
    for p in range(0, src.shape[0], GPSIMD_PARTITIONS_PER_CORE):
        nz = np.flatnonzero(x[p] != 0)
        row = np.full(f + 1, int(padding_val), dtype=np.int64)
        row[: nz.size] = nz + int(index_offset)
        row[f] = nz.size
        out[p] = row.astype(np.int32)
    _write(dst, out, exact=True)
    return _count(globals()["engine"].gpsimd, "nonzero_with_count", dst)


# ----- LNC=2: cross-core synchronisation and exchange --------------------------------------------------------------
def _lnc2(where: str):
    ctx = context.current()
    launch = ctx.launch
    check(
        launch is not None and launch.num_programs == 2,
        where,
        f"num_programs={ctx.num_programs}; only allowed with LNC=2 (kernel[2]), NeuronCore-v3 or newer (isa doc)",
    )
    target = targets.current()
    check(
        target.logical_core_size >= 2,
        where,
        f"target={target.name} ({target.core}) has no LNC=2 logical cores; NeuronCore-v3 or newer (isa doc)",
    )
    return ctx, launch


def core_barrier(data, cores, engine=engine.gpsimd, name=None):
    """Wait until both NeuronCores of an LNC=2 launch reach the barrier (isa doc ``core_barrier``: ``cores=(0, 1)``
    only; ``data`` the shared-HBM tensor both cores write)."""
    where = "nisa.core_barrier"
    ctx, launch = _lnc2(where)
    _tensor(data, where, "data")
    # The doc says `data` "must be data in shared HBM"; nki-library 2.29's bwmm_shard_on_I (written for NKI 0.3)
    # synchronises on a [1, 1] SBUF tile, so SBUF is accepted too.
    check(
        data.buffer in (MemoryRegion.shared_hbm, MemoryRegion.sbuf),
        where,
        f"data={data.describe()}; must be in shared HBM (core_barrier doc) or SBUF (as nki-library uses it)",
    )
    check(tuple(int(c) for c in cores) == (0, 1), where, f"cores={tuple(cores)}; only (0, 1) is supported")
    _count(_engine_of(engine, globals()["engine"].gpsimd), "core_barrier", data)
    timeline = ctx.cost.timeline
    timeline.sync(launch.barrier(where, ctx.program_id, timeline.end))  # both cores go on when the later arrives
    return NkiInstruction("core_barrier")


def sendrecv(src, dst, send_to_rank, recv_from_rank, pipe_id, dma_engine=dma_engine.dma, name=None):
    """Send ``src`` to core ``send_to_rank``'s ``dst`` while receiving core ``recv_from_rank``'s ``src`` into ``dst``
    (isa doc ``sendrecv``: SBUF tiles of the same dtype and shape; ranks 0 or 1; gpsimd_dma size limits)."""
    where = "nisa.sendrecv"
    ctx, launch = _lnc2(where)
    for nm, t in (("src", src), ("dst", dst)):
        _on_chip(t, where, nm, allow_psum=False)
    check(src.dtype == dst.dtype, where, f"src dtype={src.dtype.name}, dst dtype={dst.dtype.name}; must be equal")
    check(src.shape == dst.shape, where, f"src{list(src.shape)} vs dst{list(dst.shape)}; must have the same shape")
    for nm, r in (("send_to_rank", send_to_rank), ("recv_from_rank", recv_from_rank)):
        check(int(r) in (0, 1), where, f"{nm}={r}; must be 0 or 1 (the two cores of the LNC)")
    if dma_engine is globals()["dma_engine"].gpsimd_dma:
        limit = SENDRECV_GPSIMD_BYTES.get(src.dtype.itemsize, 0)
        nbytes = src.free_size * src.dtype.itemsize
        check(
            nbytes <= limit,
            where,
            f"{nbytes} bytes per partition with dma_engine=gpsimd_dma; at most {limit} for "
            f"{8 * src.dtype.itemsize}-bit types (sendrecv doc)",
        )
    me = ctx.program_id
    seq_key = (pipe_id, me, int(send_to_rank))
    seq = ctx.sendrecv_seq.get(seq_key, 0)
    ctx.sendrecv_seq[seq_key] = seq + 1
    recv_key = (pipe_id, int(recv_from_rank), me)
    rseq = ctx.sendrecv_seq.get(("recv",) + recv_key, 0)
    ctx.sendrecv_seq[("recv",) + recv_key] = rseq + 1
    payload = src.read_raw()
    sent_at = ctx.cost.timeline.ready_of(src._storage)  # the cost model's time at which src is complete
    with launch.cond:
        launch.mailbox[seq_key + (seq,)] = (payload, sent_at)
        launch.cond.notify_all()
        what = f"sendrecv pipe_id={pipe_id} from core {recv_from_rank}"
        launch.wait_for(lambda: recv_key + (rseq,) in launch.mailbox, where, me, what)
        data, partner_at = launch.mailbox.pop(recv_key + (rseq,))
    dst.write_raw(data.reshape(dst.shape))
    ctx.cost.dma("sendrecv", src.size * src.dtype.itemsize, 0, 0, after=partner_at)  # the partner's data first
    return NkiInstruction("sendrecv")
