"""``NkiTensor``: a view (shape, strides, offset, dtype) over flat NumPy storage in one memory region.

Follows the documented ``nki.language.NkiTensor`` (``aws-neuron-sdk:nki/api/nki/language/__init__.py``): slicing and
views share storage; on-chip tensors (SBUF, PSUM) keep dim 0 as the partition dim; ``.ap(...)`` overrides the access
pattern and adds runtime (indirect) offsets for DMA gather/scatter. Instructions read and write through
``read_raw`` / ``write_raw``, vectorised over the whole view (``as_strided`` or one fancy-index per instruction).
"""

from __future__ import annotations

import math
import threading
import weakref
from enum import Enum
from typing import Any, Sequence

import numpy as np

from . import dtypes
from .errors import NkiEmulatorError, check
from .language_rules import TENSOR_METHODS_0_5  # the one list of the NkiTensor methods NKI 0.5 added


class MemoryRegion(Enum):
    """Memory region constants (``nl.sbuf``, ``nl.psum``, ``nl.private_hbm`` = ``nl.hbm``, ``nl.shared_hbm``)."""

    sbuf = "sbuf"
    psum = "psum"
    private_hbm = "private_hbm"
    shared_hbm = "shared_hbm"


ON_CHIP = (MemoryRegion.sbuf, MemoryRegion.psum)
HBM = (MemoryRegion.private_hbm, MemoryRegion.shared_hbm)

# PSUM per-element state, for nc_matmul's accumulate=None inference (see docs/emulator.md, "PSUM accumulation").
PSUM_FRESH = 0  # never written since allocation
PSUM_MATMUL = 1  # last written by nc_matmul (an open accumulation group)
PSUM_OTHER = 2  # last written by a non-matmul instruction (matmul accumulation onto it is undefined on v2/v3)
PSUM_MATMUL_READ = 3  # written by nc_matmul and since read by another engine (group presumably closed)

# Instruction clock: advanced once per instruction by the cost counter. On-chip storages record the clock of their
# first and last access, which gives each tile its live range (first use .. last use), the way the compiler's
# allocator sees an unrolled kernel (context.MemoryTracker sweeps the ranges for the SBUF/PSUM capacity checks).
CLOCK = [0]

# Accesses since the last costed instruction, per thread (each program of a launch runs in its own thread): the
# cost model's timeline (cost.Timeline) takes them when it costs the instruction that made them, which gives each
# instruction the storages it read and wrote, hence its dependencies.
_ACCESSES = threading.local()


def take_accesses() -> list[tuple["Storage", bool]]:
    """``(storage, is_write)`` of every read/write on this thread since the last call."""
    log = getattr(_ACCESSES, "log", None)
    _ACCESSES.log = []
    return log or []


def _note_access(storage: "Storage", write: bool) -> None:
    log = getattr(_ACCESSES, "log", None)
    if log is None:
        log = _ACCESSES.log = []
    log.append((storage, write))


class Storage:
    """One allocation: a flat NumPy array plus the bookkeeping the strict checks need."""

    __slots__ = (
        "data",
        "buffer",
        "name",
        "shape",
        "psum_state",
        "is_input",
        "written",
        "span",
        "row_bytes",
        "__weakref__",
    )

    def __init__(self, data: np.ndarray, buffer: MemoryRegion, name: str, shape: tuple[int, ...]):
        self.data = data
        self.buffer = buffer
        self.name = name
        self.shape = shape
        self.psum_state = np.zeros(data.size, dtype=np.uint8) if buffer is MemoryRegion.psum else None
        self.is_input = False
        self.written = False
        self.span = None  # on-chip: [first access, last access, ...] record kept by context.MemoryTracker
        # address= placements live in a byte-addressed arena: partitions are row_bytes apart, not one tile row apart
        self.row_bytes = None


class _Indirect:
    """Runtime offset of an indirect view: ``kind`` 'vector' (per partition, replaces dim 0) or 'scalar'."""

    __slots__ = ("kind", "index", "stride", "bound", "dim")

    def __init__(self, kind: str, index: Any, stride: int, bound: int, dim: int):
        self.kind, self.index, self.stride, self.bound, self.dim = kind, index, stride, bound, dim


class DynamicSlice:
    """``nl.ds(start, size)``: the slice ``start:start + size``."""

    __slots__ = ("start", "size")

    def __init__(self, start: int, size: int):
        self.start, self.size = int(start), int(size)

    def __repr__(self) -> str:
        return f"ds({self.start}, {self.size})"


def _row_major_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


class NkiTensor:
    """A multi-dimensional view of storage in SBUF, PSUM or HBM (``nki.language.NkiTensor``)."""

    def __init__(
        self,
        shape,
        dtype,
        storage=None,
        buffer=MemoryRegion.sbuf,
        name: str = "",
        *,
        _strides=None,
        _offset: int = 0,
        _indirect: _Indirect | None = None,
    ):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        if storage is None:
            data = np.zeros(math.prod(self.shape), dtype=self.dtype)
            storage = Storage(
                data, MemoryRegion(buffer.value if isinstance(buffer, MemoryRegion) else buffer), name, self.shape
            )
        self._storage: Storage = storage
        self.strides = tuple(_strides) if _strides is not None else _row_major_strides(self.shape)
        self.offset = int(_offset)
        self._indirect = _indirect

    # ----- basic properties -------------------------------------------------------------------------------------
    @property
    def buffer(self) -> MemoryRegion:
        return self._storage.buffer

    @property
    def name(self) -> str:
        return self._storage.name

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def on_chip(self) -> bool:
        return self._storage.buffer in ON_CHIP

    @property
    def partitions(self) -> int:
        """Partition-dim size (dim 0) of an on-chip view."""
        return self.shape[0] if self.shape else 1

    @property
    def free_size(self) -> int:
        """Elements per partition: the product of the free dims."""
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    def describe(self) -> str:
        """``name[shape] dtype@buffer`` for error messages."""
        label = self.name or "tensor"
        return f"{label}{list(self.shape)} {self.dtype.name}@{self.buffer.value}"

    def __repr__(self) -> str:
        return f"NkiTensor({self.describe()})"

    def _derive(self, shape, strides, offset, dtype=None, indirect: Any = "keep") -> NkiTensor:
        out = NkiTensor(
            shape,
            self.dtype if dtype is None else dtype,
            self._storage,
            _strides=strides,
            _offset=offset,
            _indirect=self._indirect if indirect == "keep" else indirect,
        )
        if self._ap_where is not None:
            out._ap_where = self._ap_where
        return out

    def _where(self, op: str) -> str:
        return f"NkiTensor.{op}({self.describe()})"

    # ----- queries ----------------------------------------------------------------------------------------------
    def is_contiguous(self) -> bool:
        """Row-major contiguity of the view; for on-chip tensors only the free dims count (isa docs)."""
        return self._contiguous()

    def _contiguous(self) -> bool:
        start = 1 if self.on_chip else 0
        expected = 1
        for n, s in zip(reversed(self.shape[start:]), reversed(self.strides[start:])):
            if n != 1 and s != expected:
                return False
            expected *= n
        return True

    def get_pattern(self) -> list[list[int]]:
        """The view's access pattern as ``[[stride, count], ...]`` (partition stride = the storage's free size)."""
        pattern = [[s, n] for s, n in zip(self.strides, self.shape)]
        st = self._storage
        if st.row_bytes is not None and pattern and pattern[0][0] == st.row_bytes // self.dtype.itemsize:
            pattern[0][0] = self._logical_free()
        return pattern

    def _logical_free(self) -> int:
        """Elements of this view's dtype per partition of the allocation."""
        st = self._storage
        return math.prod(st.shape[1:]) * st.data.dtype.itemsize // self.dtype.itemsize

    def is_indirect(self) -> bool:
        return self._indirect is not None

    # ----- indexing ---------------------------------------------------------------------------------------------
    def __getitem__(self, key) -> NkiTensor:
        # Hot path (every tile view): messages are only formatted when a check fails.
        if not isinstance(key, tuple):
            key = (key,)
        if any(k is Ellipsis for k in key):
            i = next(j for j, k in enumerate(key) if k is Ellipsis)
            fill = self.ndim - (len(key) - 1)
            key = key[:i] + (slice(None),) * fill + key[i + 1 :]
        if len(key) > self.ndim:
            self._index_error(f"indices={len(key)}; more than ndim={self.ndim}")
        key = key + (slice(None),) * (self.ndim - len(key))
        shape, strides, offset = [], [], self.offset
        indirect = self._indirect
        for dim, (k, n, s) in enumerate(zip(key, self.shape, self.strides)):
            if isinstance(k, DynamicSlice):
                k = slice(k.start, k.start + k.size)
            if isinstance(k, slice):
                start, stop, step = k.start, k.stop, k.step
                step = 1 if step is None else int(step)
                if step < 1:
                    self._index_error(f"step={step} on dim {dim}; must be >= 1")
                start = 0 if start is None else int(start)
                stop = n if stop is None else int(stop)
                start = start + n if start < 0 else start
                stop = stop + n if stop < 0 else stop
                if not 0 <= start < stop <= n:
                    self._index_error(
                        f"slice={start}:{stop} on dim {dim}; must satisfy 0 <= start < stop <= {n} (no clamping)"
                    )
                if indirect is not None:
                    self._check_indirect_dim(dim, "slice", start != 0 or stop != n or step != 1)
                shape.append(len(range(start, stop, step)))
                strides.append(s * step)
                offset += start * s
            else:
                try:
                    idx = int(k)
                except TypeError:
                    self._index_error(f"index={k!r} on dim {dim}; use int, slice or nl.ds(start, size)")
                idx = idx + n if idx < 0 else idx
                if not 0 <= idx < n:
                    self._index_error(f"index={idx} on dim {dim}; out of range [0, {n})")
                if indirect is not None:
                    self._check_indirect_dim(dim, "select", True)
                offset += idx * s
                if dim == 0 and self.on_chip:
                    shape.append(1)  # the partition dim is kept (NkiTensor.__getitem__ doc)
                    strides.append(s)
        if not shape:  # HBM scalar selection: keep at least 1-D
            shape, strides = [1], [1]
        if len(shape) < 2 and self.on_chip:  # "On-chip tensors ... Result is always at least 2D" (__getitem__ doc)
            shape.append(1)
            strides.append(1)
        return self._derive(shape, strides, offset)

    def _index_error(self, message: str):
        raise NkiEmulatorError(f"{self._where('__getitem__')}: {message}") from None

    def __setitem__(self, key, value):
        raise NkiEmulatorError(
            f"{self._where('__setitem__')}: assignment to a tensor view; NKI 0.3+ writes through instructions "
            "(nisa.tensor_copy / nisa.dma_copy / nl.store with dst=...)"
        )

    def _check_indirect_dim(self, dim: int, what: str, changes: bool) -> None:
        if self._indirect is not None and changes and (dim == 0 if self._indirect.kind == "vector" else False):
            raise NkiEmulatorError(f"{self._where(what)}: dim={dim}; the indirect dimension cannot be {what}d")

    def slice(self, dim: int, start: int, end: int, step: int = 1) -> NkiTensor:
        key = [slice(None)] * self.ndim
        key[dim] = slice(start, end, step)
        return self[tuple(key)]

    def select(self, dim: int, index) -> NkiTensor:
        if isinstance(index, NkiTensor) or _is_register(index):
            check(not (self.on_chip and dim == 0), self._where("select"), "dim=0; dynamic select on the partition dim")
            check(self._indirect is None, self._where("select"), "already indirect; only one dynamic select per tensor")
            shape = self.shape[:dim] + self.shape[dim + 1 :]
            strides = self.strides[:dim] + self.strides[dim + 1 :]
            ind = _Indirect("scalar", index, self.strides[dim], self.shape[dim], dim)
            return self._derive(shape or (1,), strides or (1,), self.offset, indirect=ind)
        key = [slice(None)] * self.ndim
        key[dim] = int(index)
        out = self[tuple(key)]
        if self.on_chip and dim == 0:
            return out
        return out

    def vector_select(self, dim: int, vector_offset: NkiTensor) -> NkiTensor:
        check(dim == 0, self._where("vector_select"), f"dim={dim}; must be 0")
        check(not self.on_chip, self._where("vector_select"), "buffer on chip; only supported on HBM tensors")
        pattern = [[self.strides[0], vector_offset.shape[0]]] + self.get_pattern()[1:]
        return self.ap(pattern, vector_offset=vector_offset, indirect_dim=0)

    # ----- views ------------------------------------------------------------------------------------------------
    def permute(self, dims) -> NkiTensor:
        dims = tuple(int(d) for d in dims)
        check(sorted(dims) == list(range(self.ndim)), self._where("permute"), f"dims={dims}; not a permutation")
        check(
            not (self.on_chip or self._indirect) or dims[0] == 0,
            self._where("permute"),
            f"dims={dims}; the partition dim must stay first on chip",
        )
        return self._derive([self.shape[d] for d in dims], [self.strides[d] for d in dims], self.offset)

    def broadcast(self, dim: int, size: int) -> NkiTensor:
        check(self.shape[dim] == 1, self._where("broadcast"), f"shape[{dim}]={self.shape[dim]}; must be 1")
        check(not (self.on_chip and dim == 0), self._where("broadcast"), "dim=0; cannot broadcast the partition dim")
        shape, strides = list(self.shape), list(self.strides)
        shape[dim], strides[dim] = int(size), 0
        return self._derive(shape, strides, self.offset)

    def expand_dim(self, dim: int) -> NkiTensor:
        check(not (self.on_chip and dim == 0), self._where("expand_dim"), "dim=0; cannot insert before partition dim")
        shape, strides = list(self.shape), list(self.strides)
        shape.insert(dim, 1)
        strides.insert(dim, 0)
        return self._derive(shape, strides, self.offset)

    def squeeze_dim(self, dim: int) -> NkiTensor:
        check(self.shape[dim] == 1, self._where("squeeze_dim"), f"shape[{dim}]={self.shape[dim]}; must be 1")
        check(not (self.on_chip and dim == 0), self._where("squeeze_dim"), "dim=0; cannot remove the partition dim")
        return self._derive(
            self.shape[:dim] + self.shape[dim + 1 :], self.strides[:dim] + self.strides[dim + 1 :], self.offset
        )

    def reshape_dim(self, dim: int, shape) -> NkiTensor:
        shape = [int(s) for s in shape]
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape[shape.index(-1)] = self.shape[dim] // known
        check(
            math.prod(shape) == self.shape[dim],
            self._where("reshape_dim"),
            f"shape={tuple(shape)}; product must equal shape[{dim}]={self.shape[dim]}",
        )
        check(
            not (self.on_chip and dim == 0 and len(shape) > 1),
            self._where("reshape_dim"),
            "dim=0; cannot split the partition dim",
        )
        inner = [s * self.strides[dim] for s in _row_major_strides(shape)]
        return self._derive(
            self.shape[:dim] + tuple(shape) + self.shape[dim + 1 :],
            self.strides[:dim] + tuple(inner) + self.strides[dim + 1 :],
            self.offset,
        )

    def flatten_dims(self, start_dim: int, end_dim: int) -> NkiTensor:
        check(not (self.on_chip and start_dim == 0), self._where("flatten_dims"), "start_dim=0 on chip; must be > 0")
        for d in range(start_dim, end_dim):
            check(
                self.strides[d] == self.strides[d + 1] * self.shape[d + 1] or self.shape[d] == 1,
                self._where("flatten_dims"),
                f"dims {start_dim}..{end_dim}; not contiguous in memory",
            )
        n = math.prod(self.shape[start_dim : end_dim + 1])
        return self._derive(
            self.shape[:start_dim] + (n,) + self.shape[end_dim + 1 :],
            self.strides[:start_dim] + (self.strides[end_dim],) + self.strides[end_dim + 1 :],
            self.offset,
        )

    def reshape(self, shape) -> NkiTensor:
        shape = [int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,))]
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape[shape.index(-1)] = self.size // known
        where = self._where("reshape")
        check(math.prod(shape) == self.size, where, f"shape={tuple(shape)}; element count must stay {self.size}")
        check(self._indirect is None or shape[0] == self.shape[0], where, "indirect view; partition dim must stay")
        if self.on_chip:
            check(
                shape[0] == self.shape[0],
                where,
                f"shape[0]={shape[0]}; on-chip reshape must keep the partition dim {self.shape[0]}",
            )
            check(self._contiguous(), where, "free dims not contiguous; reshape needs a contiguous layout")
            base = self.strides[-1] if len(self.shape) > 1 and self.shape[-1] > 1 else 1
            strides = (self.strides[0],) + tuple(s * base for s in _row_major_strides(shape[1:]))
            return self._derive(shape, strides, self.offset)
        check(self._contiguous(), where, "view not contiguous; reshape needs a contiguous layout")
        return self._derive(shape, _row_major_strides(shape), self.offset)

    def rearrange(self, src_pattern: tuple, dst_pattern: tuple, fixed_sizes: dict | None = None) -> NkiTensor:
        """einops-style: split grouped source dims, permute, merge grouped destination dims."""
        fixed = dict(fixed_sizes or {})
        check(len(src_pattern) == self.ndim, self._where("rearrange"), f"src_pattern={src_pattern}; rank mismatch")
        t, names = self, []
        dim = 0
        for item in src_pattern:
            if isinstance(item, (tuple, list)):
                sizes = [fixed.get(n, -1) for n in item]
                t = t.reshape_dim(dim, sizes)
                names += list(item)
                dim += len(item)
            else:
                names.append(item)
                dim += 1
        flat_dst = [n for item in dst_pattern for n in (item if isinstance(item, (tuple, list)) else (item,))]
        check(sorted(flat_dst) == sorted(names), self._where("rearrange"), f"dst_pattern={dst_pattern}; names differ")
        t = t.permute([names.index(n) for n in flat_dst])
        dim = 0
        for item in dst_pattern:
            if isinstance(item, (tuple, list)):
                t = t.flatten_dims(dim, dim + len(item) - 1)
            dim += 1
        return t

    def view(self, dtype) -> NkiTensor:
        dtype = dtypes.as_dtype(dtype, self._where("view"))
        where = self._where("view")
        check(self._indirect is None, where, "indirect view; reinterpretation not supported after dynamic select")
        check(self.strides[-1] == 1 or self.shape[-1] == 1, where, "last dim not contiguous")
        old, new = self.dtype.itemsize, dtype.itemsize
        if old == new:
            return self._derive(self.shape, self.strides, self.offset, dtype=dtype)
        check(
            (self.shape[-1] * old) % new == 0
            and all((s * old) % new == 0 for s in self.strides[:-1])
            and (self.offset * old) % new == 0,
            where,
            f"dtype={dtype.name}; last dim {self.shape[-1]} x {old} B not divisible into {new}-byte elements",
        )
        shape = self.shape[:-1] + (self.shape[-1] * old // new,)
        strides = tuple(s * old // new for s in self.strides[:-1]) + (1,)
        return self._derive(shape, strides, self.offset * old // new, dtype=dtype)

    reinterpret_cast = view

    def ap(
        self,
        pattern,
        offset: int | None = None,
        scalar_offset=None,
        vector_offset=None,
        indirect_dim: int = 0,
        dtype=None,
    ) -> NkiTensor:
        """Explicit ``[[stride, count], ...]`` access pattern over this view's storage, optionally indirect."""
        where = self._where("ap")
        check(self._indirect is None, where, "already indirect; indirect views cannot be re-indirected")
        check(
            scalar_offset is None or vector_offset is None,
            where,
            "vector_offset and scalar_offset given; they are mutually exclusive (dma_copy doc)",
        )
        pattern = [[int(s), int(n)] for s, n in pattern]
        st = self._storage
        arena = st.row_bytes is not None and self.on_chip
        check(len(pattern) >= 1 and all(n >= 1 for _, n in pattern), where, f"pattern={pattern}; counts must be >= 1")
        new_dtype = self.dtype if dtype is None else dtypes.as_dtype(dtype, where)
        # pattern and offset count elements of the (new) dtype: the doc's example reinterprets a [128, 32] fp32 tile
        # with pattern [[64, 128], [1, 16]] in bf16; nki-library's topk_reduce offsets an int32 view of bf16 rows
        base = self.offset
        if new_dtype.itemsize != self.dtype.itemsize:
            check(
                (base * self.dtype.itemsize) % new_dtype.itemsize == 0,
                where,
                f"view offset={base} {self.dtype.name} elements; misaligned for dtype={new_dtype.name}",
            )
            base = base * self.dtype.itemsize // new_dtype.itemsize
        extra = 0 if offset is None else int(offset)
        if arena:
            # A placed tile's partitions are an arena row apart; patterns and offsets count the allocation's own
            # rows ("the partition stride must equal the storage's free-dim element count", nki-language-guide.rst)
            free = math.prod(st.shape[1:]) * st.data.dtype.itemsize // new_dtype.itemsize
            row = st.row_bytes // new_dtype.itemsize
            if pattern and pattern[0][0] == free:
                pattern[0][0] = row
            q, r = divmod(extra, free)
            extra = q * row + r
        base += extra
        shape = [n for _, n in pattern]
        strides = [s for s, _ in pattern]
        indirect = None
        check(0 <= indirect_dim < self.ndim, where, f"indirect_dim={indirect_dim}; out of range for ndim={self.ndim}")
        if vector_offset is not None or scalar_offset is not None:
            index = vector_offset if vector_offset is not None else scalar_offset
            if isinstance(index, NkiTensor):
                check(
                    index.buffer is MemoryRegion.sbuf,
                    where,
                    f"offset tensor={index.describe()}; indirect offsets must be in SBUF (dma_copy doc)",
                )
            kind = "vector" if vector_offset is not None else "scalar"
            if kind == "vector":
                check(not self.on_chip, where, f"buffer={self.buffer.value}; vector_offset needs an HBM tensor")
                check(
                    index.shape[0] == pattern[0][1] and index.free_size == 1,
                    where,
                    f"vector_offset{list(index.shape)}; must be (P, 1) with P = pattern[0] count {pattern[0][1]}",
                )
            stride = self.strides[indirect_dim]
            if new_dtype.itemsize != self.dtype.itemsize:
                stride = stride * self.dtype.itemsize // new_dtype.itemsize
            indirect = _Indirect(kind, index, stride, self.shape[indirect_dim], indirect_dim)
        out = NkiTensor(shape, new_dtype, self._storage, _strides=strides, _offset=base, _indirect=indirect)
        # Checked when the view is first read or written, not when built: kernels build views they then skip
        # (nki-library 2.29 output_projection_tkg builds the stationary .ap before `if h_2_idx < h_2_size`).
        out._ap_where = where
        return out

    def indirect(self, index, num_elem=None) -> NkiTensor:
        raise NkiEmulatorError(
            f"{self._where('indirect')}: tensor indirection; NeuronCore-v4 (trn3) only, the emulator models trn2"
        )

    # ----- data access (used by instructions) -------------------------------------------------------------------
    def _flat(self) -> np.ndarray:
        data = self._storage.data
        return data if data.dtype == self.dtype else data.view(self.dtype)

    def _check_static_bounds(self, where: str) -> None:
        n = self._flat().size
        lo = self.offset + sum(s * (c - 1) for s, c in zip(self.strides, self.shape) if s < 0)
        hi = self.offset + sum(s * (c - 1) for s, c in zip(self.strides, self.shape) if s > 0)
        if self._indirect is not None and self._indirect.kind == "vector":
            hi -= max(self.strides[0], 0) * (self.shape[0] - 1)
            lo -= min(self.strides[0], 0) * (self.shape[0] - 1)
        check(
            lo >= 0 and hi < n,
            where,
            f"pattern={self.get_pattern()} offset={self.offset}; "
            f"addresses [{lo}, {hi}] fall outside the allocation of {n} elements",
        )

    def _array(self, writeable: bool = False) -> np.ndarray:
        flat = self._flat()
        isz = flat.itemsize
        return np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.shape, strides=[s * isz for s in self.strides], writeable=writeable
        )

    def _addresses(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Element addresses of an indirect view, resolved now, and a per-element validity mask (None = all)."""
        ind = self._indirect
        idx_t = ind.index
        if isinstance(idx_t, NkiTensor):
            idx = idx_t.read_raw().reshape(-1).astype(np.int64)
            check(
                idx_t.dtype in dtypes.INT_DTYPES,
                self._where("ap"),
                f"offset dtype={idx_t.dtype.name}; indirect offsets must be an integer dtype",
            )
        else:
            idx = np.array([int(_register_value(idx_t))], dtype=np.int64)
        addr = np.full(self.shape, self.offset, dtype=np.int64)
        for d, (n, s) in enumerate(zip(self.shape, self.strides)):
            if ind.kind == "vector" and d == 0:
                continue
            shp = [1] * self.ndim
            shp[d] = n
            addr += (np.arange(n, dtype=np.int64) * s).reshape(shp)
        if ind.kind == "vector":
            shp = [1] * self.ndim
            shp[0] = self.shape[0]
            addr += (idx * ind.stride).reshape(shp)
            valid = ((idx >= 0) & (idx < ind.bound)).reshape(shp)
        else:
            addr += idx[0] * ind.stride
            valid = np.full([1] * self.ndim, bool(0 <= idx[0] < ind.bound))
        valid = np.broadcast_to(valid, self.shape) & (addr >= 0) & (addr < self._flat().size)
        return addr, (None if valid.all() else valid)

    def oob_mask(self) -> np.ndarray | None:
        """Per-element validity of an indirect view now (None: all valid or not indirect)."""
        return None if self._indirect is None else self._addresses()[1]

    _ap_where: str | None = None  # an .ap() view whose bounds are checked at first access

    def _check_ap(self) -> None:
        where, self._ap_where = self._ap_where, None
        self._check_static_bounds(where)

    def read_raw(self, valid: np.ndarray | None = None) -> np.ndarray:
        """A copy of the view's elements in its own dtype (invalid indirect elements read as 0)."""
        if self._ap_where is not None:
            self._check_ap()
        _note_access(self._storage, False)
        span = self._storage.span
        if span is not None:
            if span[0] < 0:
                span[0] = CLOCK[0]
            span[1] = CLOCK[0]
        if self._indirect is None:
            return np.array(self._array())
        addr, ok = self._addresses()
        flat = self._flat()
        if ok is None:
            return flat[addr]
        out = np.zeros(self.shape, dtype=self.dtype)
        out[ok] = flat[addr[ok]]
        return out

    def write_raw(self, values: np.ndarray, skip_invalid: bool = False) -> None:
        """Store ``values`` (already in this view's dtype) into the view."""
        if self._ap_where is not None:
            self._check_ap()
        values = np.broadcast_to(np.asarray(values, dtype=self.dtype), self.shape)
        storage = self._storage
        if storage.is_input:
            storage.written = True
        _note_access(storage, True)
        span = storage.span
        if span is not None:
            if span[0] < 0:
                span[0] = CLOCK[0]
            span[1] = CLOCK[0]
        if self._indirect is None:
            if any(s == 0 and n > 1 for s, n in zip(self.strides, self.shape)):
                # A 0-stride access pattern as destination (nki-library 2.29 qkv_cte writes a scratch activation
                # through `.ap([[1, n], [0, H]])`): elements are written in pattern order, the last write stays.
                addr = np.full(self.shape, self.offset, dtype=np.int64)
                for d, (n, st) in enumerate(zip(self.shape, self.strides)):
                    shp = [1] * self.ndim
                    shp[d] = n
                    addr += (np.arange(n, dtype=np.int64) * st).reshape(shp)
                flat = self._flat()
                last = {a: i for i, a in enumerate(addr.ravel().tolist())}
                idx = np.fromiter(last.values(), dtype=np.int64)
                flat[np.fromiter(last.keys(), dtype=np.int64)] = values.reshape(-1)[idx]
                return
            self._array(writeable=True)[...] = values
            return
        addr, ok = self._addresses()
        if ok is not None:
            check(skip_invalid, self._where("write"), "indirect offset out of bounds; oob_mode=error")
            addr, values = addr[ok], values[ok]
        self._flat()[addr] = values

    # ----- PSUM accumulation state ------------------------------------------------------------------------------
    def psum_state(self) -> np.ndarray:
        """Writable per-element PSUM state view (uint8), laid out like this view."""
        if self._ap_where is not None:
            self._check_ap()
        st = self._storage.psum_state
        ratio = self.dtype.itemsize / self._storage.data.dtype.itemsize
        check(ratio == 1, self._where("psum_state"), "PSUM view with a reinterpreted dtype; not supported")
        return np.lib.stride_tricks.as_strided(
            st[self.offset :], shape=self.shape, strides=self.strides, writeable=True
        )


_VIEW_IMPLS = {n: NkiTensor.__dict__[n] for n in TENSOR_METHODS_0_5}


def _absent_method(name: str, release: str):
    def absent(self, *args, **kwargs):
        raise NkiEmulatorError(
            f"NkiTensor.{name}({self.describe()}): not in NKI {release}; the NkiTensor view and query methods arrive "
            "in NKI 0.5 (release-notes/components/nki.rst 0.5.0, 'New NkiTensor view primitives')"
        )

    return absent


def set_view_methods(release: str) -> None:
    """Expose the 0.5 view methods only for releases that have them (class attributes: no per-call cost)."""
    new = tuple(int(p) for p in release.split(".")) >= (0, 5)
    for name, impl in _VIEW_IMPLS.items():
        setattr(NkiTensor, name, impl if new else _absent_method(name, release))


def _is_register(x: Any) -> bool:
    return type(x).__name__ == "VirtualRegister"


def _register_value(x: Any) -> int:
    return int(x.value) if _is_register(x) else int(x)


def tensor_finalizer(storage: Storage, callback, *args) -> None:
    """Call ``callback(*args)`` when ``storage`` is garbage collected (frees its SBUF/PSUM budget)."""
    weakref.finalize(storage, callback, *args)
