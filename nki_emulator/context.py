"""Per-program state of a running kernel: on-chip capacity accounting, engine registers, cost counter, grid position.

One ``ProgramContext`` exists per program of a launch (``kernel[2]`` runs two, one per NeuronCore, each with its own
SBUF/PSUM). Code that allocates outside any kernel (tests, a REPL) gets a default context.
"""

from __future__ import annotations

import math

import numpy as np

from .hardware import PMAX, PSUM_BANK_BYTES, PSUM_NUM_BANKS, SBUF_PARTITION_BYTES

from . import dtypes
from .cost import CostCounter
from .errors import NkiEmulatorError, check
from .tensor import HBM, MemoryRegion, NkiTensor, Storage, tensor_finalizer


class MemoryTracker:
    """Live SBUF bytes per partition and live PSUM banks; allocations are released when their storage dies.

    Accounting model (documented in docs/emulator.md): an SBUF tensor ``[P, f...]`` occupies
    ``prod(f) * itemsize`` bytes in every partition (the allocator reserves the same free range on all partitions);
    a PSUM tensor occupies one whole 2 KiB bank per partition, however small (matmul accumulation groups are
    bank-granular), and may not exceed one bank.
    """

    def __init__(self) -> None:
        self.sbuf_bytes = 0
        self.psum_banks = 0
        self.peak_sbuf_bytes = 0
        self.peak_psum_banks = 0

    def allocate(self, tensor: NkiTensor) -> None:
        where = f"nl.ndarray({tensor.describe()})"
        buf = tensor.buffer
        if buf not in (MemoryRegion.sbuf, MemoryRegion.psum):
            return
        check(
            tensor.ndim >= 1 and tensor.shape[0] <= PMAX,
            where,
            f"partition dim={tensor.shape[0]}; exceeds pmax={PMAX} (tiling-overview.rst, Tile-Size Constraint #1)",
        )
        per_partition = tensor.free_size * tensor.dtype.itemsize
        if buf is MemoryRegion.sbuf:
            check(
                self.sbuf_bytes + per_partition <= SBUF_PARTITION_BYTES,
                where,
                f"SBUF bytes per partition={self.sbuf_bytes + per_partition} ({self.sbuf_bytes} live + "
                f"{per_partition} new); exceeds the usable {SBUF_PARTITION_BYTES} B per partition "
                "(limits.SBUF_PARTITION_BYTES: 224 KiB minus the compiler's reserve)",
            )
            self.sbuf_bytes += per_partition
            self.peak_sbuf_bytes = max(self.peak_sbuf_bytes, self.sbuf_bytes)
            tensor_finalizer(tensor._storage, self._release_sbuf, per_partition)
        else:
            check(
                per_partition <= PSUM_BANK_BYTES,
                where,
                f"PSUM bytes per partition={per_partition}; exceeds one {PSUM_BANK_BYTES} B bank "
                "(tiling-overview.rst, Tile-Size Constraint #2: psum_bank_fmax=512 fp32)",
            )
            check(
                self.psum_banks + 1 <= PSUM_NUM_BANKS,
                where,
                f"live PSUM banks={self.psum_banks + 1}; exceeds the {PSUM_NUM_BANKS} banks per partition "
                "(tile_size.psum_num_banks; free PSUM tiles by dropping references)",
            )
            self.psum_banks += 1
            self.peak_psum_banks = max(self.peak_psum_banks, self.psum_banks)
            tensor_finalizer(tensor._storage, self._release_psum)

    def _release_sbuf(self, nbytes: int) -> None:
        self.sbuf_bytes -= nbytes

    def _release_psum(self) -> None:
        self.psum_banks -= 1


class ProgramContext:
    """State of one program (one NeuronCore) of a kernel launch."""

    def __init__(self, program_id: int = 0, num_programs: int = 1, shared: list | None = None) -> None:
        self.program_id = program_id
        self.num_programs = num_programs
        # nl.shared_hbm tensors are one tensor for all programs of a launch: the j-th shared_hbm allocation of
        # every program maps to the same storage (``shared`` is the launch-wide list).
        self.shared = shared
        self.shared_index = 0
        self.memory = MemoryTracker()
        self.cost = CostCounter()
        # Scalar Engine reduce registers (nisa.activation doc: one 32-bit register per lane, 128 lanes) and the
        # Vector Engine accumulator registers (tensor_scalar_cumulative doc). Unset registers read as NaN.
        self.act_regs = np.full(PMAX, np.nan, dtype=np.float32)
        self.vec_regs = np.full(PMAX, np.nan, dtype=np.float32)


_DEFAULT = ProgramContext()
_current: ProgramContext = _DEFAULT


def current() -> ProgramContext:
    """The running program's context (or the default one outside kernels)."""
    return _current


def set_current(ctx: ProgramContext | None) -> ProgramContext:
    """Install ``ctx`` (None: the default) and return the previous context."""
    global _current
    prev = _current
    _current = _DEFAULT if ctx is None else ctx
    return prev


def allocate(shape, dtype, buffer, name: str = "", fill=None) -> NkiTensor:
    """Allocate a tensor; fresh memory reads as NaN (floats) or ``INT_FRESH_SENTINEL`` unless ``fill`` is given."""
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    dt = dtypes.as_dtype(dtype, f"nl.ndarray(name={name!r})")
    buffer = _as_buffer(buffer)
    check(
        len(shape) >= 1 and all(s >= 1 for s in shape),
        f"nl.ndarray(name={name!r})",
        f"shape={shape}; every dim must be >= 1",
    )
    ctx = current()
    if buffer is MemoryRegion.shared_hbm and ctx.shared is not None:
        j = ctx.shared_index
        ctx.shared_index += 1
        if j < len(ctx.shared):
            st = ctx.shared[j]
            check(
                st.shape == shape and st.data.dtype == dt,
                f"nl.ndarray(name={name!r})",
                f"shape={shape} dtype={dt.name}; shared_hbm allocation #{j} differs between programs "
                f"({st.shape} {st.data.dtype.name})",
            )
            return NkiTensor(shape, dt, st)
    if fill is None:
        fill = np.nan if dtypes.is_float(dt) else dtypes.INT_FRESH_SENTINEL
    data = np.empty(math.prod(shape), dtype=dt)
    data[...] = dtypes.convert(np.asarray(fill, dtype=np.float32), dt) if dtypes.is_float(dt) else fill
    storage = Storage(data, buffer, name, shape)
    t = NkiTensor(shape, dt, storage)
    ctx.memory.allocate(t)
    if buffer is MemoryRegion.shared_hbm and ctx.shared is not None:
        ctx.shared.append(storage)
    return t


def _as_buffer(buffer) -> MemoryRegion:
    if isinstance(buffer, MemoryRegion):
        return buffer
    raise NkiEmulatorError(
        f"nl.ndarray: buffer={buffer!r}; use nl.sbuf, nl.psum, nl.hbm, nl.private_hbm or "
        "nl.shared_hbm (string buffer names are not accepted since NKI 0.3)"
    )


def is_hbm(buffer) -> bool:
    return buffer in HBM
