"""``nki.language``: dtypes, buffers, tile sizes, creation functions, loops, SPMD ids, operators and the
experimental convenience wrappers (``nl.load``/``store``/``copy``/``matmul``/``exp``/...).

Follows ``aws-neuron-sdk:nki/api/nki/language/__init__.py``. The convenience wrappers are built from ``nki.isa``
instructions (so they are checked and counted like hand-written ISA code) and return new SBUF tiles, or PSUM tiles
for ``matmul``/``transpose``, as documented.
"""

from __future__ import annotations

import builtins
import contextlib
import copy as _copy
import dataclasses

import numpy as np

from . import context, isa
from .dtypes import (  # noqa: F401  (re-exported as nl.<dtype>)
    bfloat16,
    bool_,
    float4_e2m1fn_x4,
    float8_e4m3,
    float8_e4m3fn,
    float8_e4m3fn_x4,
    float8_e5m2,
    float8_e5m2_x4,
    float8_e8m0fnu,
    float16,
    float32,
    int8,
    int16,
    int32,
    tfloat32,
    uint8,
    uint16,
    uint32,
)
from .errors import NkiEmulatorError, check
from .hardware import (
    GEMM_MOVING_FMAX,
    GEMM_STATIONARY_FMAX,
    PMAX,
    PSUM_BANK_BYTES,
    PSUM_BANK_FMAX,
    PSUM_NUM_BANKS,
    SBUF_PARTITION_BYTES,
    SBUF_PARTITION_BYTES_PHYSICAL,
)
from .ops import OPS, MathOp
from .tensor import _VIEW_IMPLS, DynamicSlice, MemoryRegion, NkiTensor


class NKIObject:
    """Base of classes used inside kernels (nki-language-guide.rst, "Class Support").

    As the compiler does, a subclass gets an initialiser if it has none: annotated fields in order, positionally or by
    keyword, each defaulting to its class value or None ("fields without values"), then ``__post_init__``. Fields
    without a value get the class default None before ``@dataclass`` sees the class, so AWS's config dataclasses
    (required fields after defaulted ones) construct as under the compiler.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        ann = dict(cls.__dict__.get("__annotations__", {}))
        for name in ann:
            if name not in cls.__dict__:
                setattr(cls, name, None)
        # Plain class attributes are fields too (the compiler builds __init__ from the object dictionary; nki-library's
        # `@dataclass class SectionParams(nl.NKIObject): section_idx = None` is constructed by keyword).
        for name, value in list(cls.__dict__.items()):
            if name.startswith("_") or name in ann or callable(value):
                continue
            if isinstance(value, (staticmethod, classmethod, property)):
                continue
            ann[name] = object
            if isinstance(value, (list, dict, set)):
                setattr(cls, name, dataclasses.field(default_factory=lambda v=value: _copy.copy(v)))
        cls.__annotations__ = ann

    @classmethod
    def _nki_fields(cls) -> list[str]:
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            for n in klass.__dict__.get("__annotations__", {}):
                if n not in names:
                    names.append(n)
        return names

    def __init__(self, *args, **kwargs):
        fields = self._nki_fields()
        if len(args) > len(fields):
            raise TypeError(f"{type(self).__name__}: {len(args)} positional arguments; it has {len(fields)} fields")
        values = dict(zip(fields, args))
        for k, v in kwargs.items():
            if k not in fields or k in values:
                raise TypeError(f"{type(self).__name__}: unexpected or repeated field {k!r} (fields: {fields})")
            values[k] = v
        for f in fields:
            object.__setattr__(self, f, values[f] if f in values else getattr(type(self), f, None))
        post = getattr(self, "__post_init__", None)
        if post is not None:
            post()


sbuf = MemoryRegion.sbuf
psum = MemoryRegion.psum
private_hbm = MemoryRegion.private_hbm
hbm = MemoryRegion.private_hbm  # "HBM - Alias of private_hbm"
shared_hbm = MemoryRegion.shared_hbm


class _TileSize:
    """Hardware tile-size constants (``nl.tile_size``); values from ``kernels/limits.py``."""

    pmax = PMAX
    psum_fmax = PSUM_BANK_FMAX
    psum_bank_fmax = PSUM_BANK_FMAX
    psum_bank_fmax_bytes = PSUM_BANK_BYTES
    gemm_stationary_fmax = GEMM_STATIONARY_FMAX
    gemm_moving_fmax = GEMM_MOVING_FMAX
    bn_stats_fmax = 512  # nisa.bn_stats free-size limit (tile_size docs); bn_stats itself is not emulated
    psum_min_align = 4  # bytes; not enforced by the emulator
    sbuf_min_align = 4  # bytes; not enforced by the emulator
    psum_num_banks = PSUM_NUM_BANKS
    sbuf_size_bytes = PMAX * SBUF_PARTITION_BYTES_PHYSICAL
    sbuf_fmax_bytes = SBUF_PARTITION_BYTES
    sbuf_fmax = SBUF_PARTITION_BYTES // 4
    total_available_sbuf_size = SBUF_PARTITION_BYTES


tile_size = _TileSize()

# ----- operators as module attributes (nl.add, nl.exp, ...) -------------------------------------------------------
globals().update(OPS)
bypass = OPS["bypass"]
average = MathOp("average", lambda a, b: (a + b) / 2, "lang", arity=2)


def is_hbm(buffer) -> bool:
    return buffer in (private_hbm, shared_hbm)


def is_on_chip(buffer) -> bool:
    return buffer in (sbuf, psum)


def is_psum(buffer) -> bool:
    return buffer is psum


def is_sbuf(buffer) -> bool:
    return buffer is sbuf


# ----- creation ----------------------------------------------------------------------------------------------------
def ndarray(shape, dtype, buffer=sbuf, name="", address=None) -> NkiTensor:
    """A new tensor; its contents read as NaN (floats) until written, as in the official simulator.

    ``address=(partition_offset, byte_offset)`` places an SBUF/PSUM tile explicitly; handles at the same placement
    with the same footprint alias one allocation (context.MemoryTracker)."""
    return context.allocate(shape, dtype, buffer, name, address=address)


def _filled(shape, value, dtype, buffer, name) -> NkiTensor:
    t = context.allocate(shape, dtype, buffer, name)
    if is_on_chip(t.buffer):
        isa.memset(t, value)
    else:
        t.write_raw(np.full(t.shape, value).astype(t.dtype))
    return t


def zeros(shape, dtype, buffer=sbuf, name="") -> NkiTensor:
    return _filled(shape, 0, dtype, buffer, name)


def ones(shape, dtype, buffer=sbuf, name="") -> NkiTensor:
    return _filled(shape, 1, dtype, buffer, name)


def full(shape, fill_value, dtype, buffer=sbuf, name="") -> NkiTensor:
    return _filled(shape, fill_value, dtype, buffer, name)


def zeros_like(x, dtype=None, buffer=None, name="") -> NkiTensor:
    return zeros(x.shape, x.dtype if dtype is None else dtype, sbuf if buffer is None else buffer, name)


def empty_like(x, dtype=None, buffer=None, name="") -> NkiTensor:
    return ndarray(x.shape, x.dtype if dtype is None else dtype, x.buffer if buffer is None else buffer, name)


def shared_constant(constant) -> NkiTensor:
    """A shared-HBM tensor holding ``constant`` (an array or a .npy path)."""
    arr = np.load(constant) if isinstance(constant, str) else np.asarray(constant)
    t = context.allocate(arr.shape, arr.dtype, shared_hbm, "shared_constant")
    t.write_raw(arr)
    return t


def shared_identity_matrix(n, dtype=uint8, dst=None) -> NkiTensor:
    """An [n, n] identity in SBUF (counts against the SBUF budget)."""
    t = dst if dst is not None else context.allocate((n, n), dtype, sbuf, "identity")
    check(t.shape == (n, n), "nl.shared_identity_matrix", f"dst{list(t.shape)}; must be [{n}, {n}]")
    t.write_raw(np.eye(n).astype(t.dtype))
    return t


def rand(shape, dtype, buffer=sbuf, name="") -> NkiTensor:
    t = context.allocate(shape, dtype, buffer, name)
    t.write_raw(np.random.default_rng().random(t.shape).astype(t.dtype))
    return t


# ----- loops, slices, SPMD ids -------------------------------------------------------------------------------------
def ds(start, size) -> DynamicSlice:
    return DynamicSlice(start, size)


def affine_range(start, stop=None, step=1):
    """Deprecated alias of ``range`` (NKI 0.6: all static loops are unrolled)."""
    return builtins.range(start, stop, step) if stop is not None else builtins.range(start)


sequential_range = affine_range
static_range = affine_range
range = affine_range  # noqa: A001 (the documented name)


def dynamic_range(start, stop=None, step=1):
    s = int(start)
    return builtins.range(s, int(stop), step) if stop is not None else builtins.range(s)


_LOOP_RULES = "nki/migration/index.rst, 'Rules for migrated loops' (NKI 0.6)"


def fori_loop(lower, upper, body_fun, step=1) -> None:
    """Runtime counted loop: ``body_fun(i)`` for i in range(lower, upper, step) with i a read-only register."""
    where = "nl.fori_loop"
    check(
        isinstance(step, (int, np.integer)) and not isinstance(step, bool) and step > 0,
        where,
        f"step={step!r}; must be a positive compile-time integer ({_LOOP_RULES})",
    )
    check(context.current().in_no_reorder == 0, where, f"inside nl.no_reorder(); not allowed ({_LOOP_RULES})")
    for i in builtins.range(int(lower), int(upper), int(step)):
        res = body_fun(isa.VirtualRegister(i, frozen=True))
        check(res is None, where, f"body returned {res!r}; the fori_loop body cannot return a value ({_LOOP_RULES})")


def while_loop(init, body_fun) -> None:
    """Runtime while loop: runs ``body_fun(reg)`` while the register is non-zero; the body returns the condition."""
    where = "nl.while_loop"
    check(context.current().in_no_reorder == 0, where, f"inside nl.no_reorder(); not allowed ({_LOOP_RULES})")
    r = init
    while int(r) != 0:
        r = body_fun(r)
        check(
            isinstance(r, isa.VirtualRegister),
            where,
            f"body returned {r!r}; the while_loop body returns only the next condition register ({_LOOP_RULES})",
        )


def program_id(axis=0) -> int:
    check(axis == 0, "nl.program_id", f"axis={axis}; the emulator supports 1-D launch grids")
    return context.current().program_id


def num_programs(axes=0) -> int:
    return context.current().num_programs


def program_ndim() -> int:
    return 1 if context.current().num_programs > 1 else 0


@contextlib.contextmanager
def no_reorder():
    ctx = context.current()
    ctx.in_no_reorder += 1
    try:
        yield
    finally:
        ctx.in_no_reorder -= 1


def device_print(print_prefix, tensor) -> None:
    print(print_prefix, tensor.read_raw())


# ----- convenience wrappers ------------------------------------------------------------------------------------------
def load(src: NkiTensor, dtype=None) -> NkiTensor:
    """HBM -> new SBUF tile (one DMA)."""
    check(isinstance(src, NkiTensor) and is_hbm(src.buffer), "nl.load", f"src={src!r}; must be an HBM tensor")
    t = context.allocate(
        src.shape if len(src.shape) > 1 else (1, src.shape[0]), src.dtype if dtype is None else dtype, sbuf, "load"
    )
    isa.dma_copy(t, src)
    return t


def store(dst: NkiTensor, value: NkiTensor) -> None:
    """SBUF tile -> HBM (one DMA)."""
    check(isinstance(dst, NkiTensor) and is_hbm(dst.buffer), "nl.store", f"dst={dst!r}; must be an HBM tensor")
    isa.dma_copy(dst, value)


def load_transpose2d(src: NkiTensor, dtype=None) -> NkiTensor:
    t = context.allocate((src.shape[1], src.shape[0]), src.dtype if dtype is None else dtype, sbuf, "load_t")
    isa.dma_transpose(t, src)
    return t


def copy_tile(x: NkiTensor, dtype=None) -> NkiTensor:
    t = context.allocate(x.shape, x.dtype if dtype is None else dtype, sbuf, "copy")
    isa.tensor_copy(t, x)
    return t


def matmul(x: NkiTensor, y: NkiTensor, transpose_x=False) -> NkiTensor:
    """``x.T @ y`` into a new float32 PSUM tile (transpose_x=True is required, NKI 0.4 known limitation)."""
    check(transpose_x, "nl.matmul", "transpose_x=False; the convenience matmul requires transpose_x=True (x is [K, M])")
    t = context.allocate((x.free_size, y.free_size), float32, psum, "matmul")
    isa.nc_matmul(t, x, y)
    return t


def transpose(x: NkiTensor, dtype=None) -> NkiTensor:
    t = context.allocate((x.free_size, x.shape[0]), x.dtype, psum, "transpose")
    isa.nc_transpose(t, x)
    return t


def _elementwise(op: MathOp, x, y=None, dtype=None):
    """nl.<op>(x[, y], dtype=None): new SBUF tile via the matching instruction."""
    if op.arity == 1 or (y is None and op.arity == 2 and op.kind == "lang"):
        check(isinstance(x, NkiTensor), f"nl.{op.name}", f"x={x!r}; must be a tile")
        out = context.allocate(x.shape, x.dtype if dtype is None else dtype, sbuf, op.name)
        if op.name == "copy":
            isa.tensor_copy(out, x)
        elif op.activation:
            isa.activation(out, op, x)
        else:
            _vector_math(out, op, x)
        return out
    if not isinstance(x, NkiTensor) and isinstance(y, NkiTensor):
        return _scalar_first(op, x, y, dtype)
    check(isinstance(x, NkiTensor), f"nl.{op.name}", f"x={x!r}; at least one operand must be a tile")
    out = context.allocate(x.shape, x.dtype if dtype is None else dtype, sbuf, op.name)
    if isinstance(y, NkiTensor):
        check(
            x.shape == y.shape,
            f"nl.{op.name}",
            f"shapes {list(x.shape)} and {list(y.shape)}; no broadcasting in binary ops (NKI 0.4 known limitation)",
        )
        if op.kind in ("arith", "bitvec"):
            isa.tensor_tensor(out, x, y, op)
        else:
            _vector_math(out, op, x, y)
    elif op.kind in ("arith", "bitvec"):
        isa.tensor_scalar(out, x, op, float(y) if op.kind == "arith" else int(y))
    else:
        _vector_math(out, op, x, y)
    return out


def _scalar_first(op: MathOp, x, y: NkiTensor, dtype):
    out = context.allocate(y.shape, y.dtype if dtype is None else dtype, sbuf, op.name)
    isa.tensor_scalar(out, y, op, float(x), reverse0=True)
    return out


def _vector_math(out: NkiTensor, op: MathOp, x: NkiTensor, y=None) -> None:
    """Operators with no single instruction (cos, floor, divide, ...): computed in fp32, counted as one vector op."""
    a = isa._read32(x)
    b = isa._read32(y) if isinstance(y, NkiTensor) else (None if y is None else np.float32(y))
    res = op.fn(a) if b is None else op.fn(a, b)
    isa._write(out, np.asarray(res, dtype=np.float32))
    isa._count(isa.engine.vector, f"nl.{op.name}", out)


for _op in OPS.values():
    _op.wrapper = _elementwise
average.wrapper = _elementwise


def _reduce(op_name: str, x: NkiTensor, axis, dtype=None, keepdims=False) -> NkiTensor:
    axes = isa._norm_axes(axis, x, f"nl.{op_name}")
    kept = [s for d, s in enumerate(x.shape) if d not in axes]
    shape = [s if d not in axes else 1 for d, s in enumerate(x.shape)] if keepdims else (kept + [1] * (len(kept) < 2))
    out = context.allocate(shape, x.dtype if dtype is None else dtype, sbuf, op_name)
    isa.tensor_reduce(out, OPS[op_name], x, axes, keepdims=keepdims)
    return out


def sum(x, axis, dtype=None, keepdims=False):  # noqa: A001
    return _reduce("add", x, axis, dtype, keepdims)


def max(x, axis, dtype=None, keepdims=False):  # noqa: A001
    return _reduce("maximum", x, axis, dtype, keepdims)


def min(x, axis, dtype=None, keepdims=False):  # noqa: A001
    return _reduce("minimum", x, axis, dtype, keepdims)


def prod(x, axis, dtype=None, keepdims=False):
    return _reduce("multiply", x, axis, dtype, keepdims)


def mean(x, axis, dtype=None, keepdims=False):
    s = _reduce("add", x, axis, float32, keepdims)
    n = x.size // x.shape[0] // s.free_size
    out = context.allocate(s.shape, x.dtype if dtype is None else dtype, sbuf, "mean")
    isa.tensor_scalar(out, s, OPS["multiply"], 1.0 / n)
    return out


def softmax(x: NkiTensor, axis=-1, dtype=None) -> NkiTensor:
    """Row softmax from instructions: max, exp(x - max) with add-reduce, reciprocal, multiply."""
    isa._norm_axes(axis, x, "nl.softmax")
    p = x.shape[0]
    mx = context.allocate((p, 1), float32, sbuf, "softmax_max")
    isa.tensor_reduce(mx, OPS["maximum"], x, tuple(builtins.range(1, x.ndim)), negate=True)
    e = context.allocate(x.shape, float32, sbuf, "softmax_exp")
    s = context.allocate((p, 1), float32, sbuf, "softmax_sum")
    isa.activation(
        e, OPS["exp"], x, bias=mx, reduce_op=OPS["add"], reduce_res=s, reduce_cmd=isa.reduce_cmd.reset_reduce
    )
    r = context.allocate((p, 1), float32, sbuf, "softmax_rcp")
    isa.reciprocal(r, s)
    out = context.allocate(x.shape, x.dtype if dtype is None else dtype, sbuf, "softmax")
    isa.tensor_scalar(out, e, OPS["multiply"], r)
    return out


def rms_norm(x, w, axis, n, epsilon=1e-06, dtype=None, compute_dtype=None) -> NkiTensor:
    """``x / sqrt(mean(x^2) + eps) * w`` from instructions."""
    p = x.shape[0]
    sq = context.allocate(x.shape, float32, sbuf, "rms_sq")
    ss = context.allocate((p, 1), float32, sbuf, "rms_ss")
    isa.activation(sq, OPS["square"], x, reduce_op=OPS["add"], reduce_res=ss, reduce_cmd=isa.reduce_cmd.reset_reduce)
    rs = context.allocate((p, 1), float32, sbuf, "rms_rstd")
    isa.tensor_scalar(rs, ss, OPS["multiply"], 1.0 / n, op1=OPS["add"], operand1=float(epsilon))
    isa.activation(rs, OPS["rsqrt"], rs)
    xn = context.allocate(x.shape, float32, sbuf, "rms_xn")
    isa.tensor_scalar(xn, x, OPS["multiply"], rs)
    out = context.allocate(x.shape, x.dtype if dtype is None else dtype, sbuf, "rms_norm")
    isa.tensor_tensor(out, xn, w, OPS["multiply"])
    return out


def where(condition, x, y, dtype=None) -> NkiTensor:
    out = context.allocate(x.shape, x.dtype if dtype is None else dtype, sbuf, "where")
    c = isa._read32(condition) != 0
    yv = isa._read32(y) if isinstance(y, NkiTensor) else np.float32(y)
    isa._write(out, np.where(c, isa._read32(x), yv).astype(np.float32))
    isa._count(isa.engine.vector, "nl.where", out)
    return out


def expand_dims(x: NkiTensor, axis) -> NkiTensor:
    return _VIEW_IMPLS["expand_dim"](x, axis)


def broadcast_to(x: NkiTensor, shape, dtype=None) -> NkiTensor:
    shape = tuple(shape)
    check(
        len(shape) == x.ndim and builtins.all(a == b or a == 1 for a, b in zip(x.shape, shape)),
        "nl.broadcast_to",
        f"shape={shape}; must have rank {x.ndim} and broadcast from {list(x.shape)}",
    )
    out = context.allocate(shape, x.dtype if dtype is None else dtype, sbuf, "broadcast_to")
    isa._write(out, np.broadcast_to(isa._read32(x).reshape(x.shape), shape).astype(np.float32))
    isa._count(isa.engine.vector, "nl.broadcast_to", out)
    return out


def gather_flattened(data: NkiTensor, indices: NkiTensor, axis=0, dtype=None) -> NkiTensor:
    out = context.allocate(indices.shape, data.dtype if dtype is None else dtype, sbuf, "gather")
    d = isa._read2d(data)
    idx = isa._read2d(indices).astype(np.int64)
    check(np.all((idx >= 0) & (idx < d.shape[1])), "nl.gather_flattened", "indices out of range of the free dim")
    isa._write(out, np.take_along_axis(d, idx, axis=1), exact=out.dtype == data.dtype)
    isa._count(isa.engine.gpsimd, "nl.gather_flattened", out)
    return out


def _not_supported(name: str):
    def fn(*args, **kwargs):
        raise NkiEmulatorError(f"nl.{name}: not implemented by the emulator (see docs/emulator.md, 'Gaps')")

    return fn


dropout = _not_supported("dropout")
random_seed = _not_supported("random_seed")
var = _not_supported("var")
all = _not_supported("all")  # noqa: A001

# ``nl.copy`` is both an operator (activation op=nl.copy) and a function returning an SBUF copy.
OPS["copy"].wrapper = lambda _op, x, dtype=None: copy_tile(x, dtype)
