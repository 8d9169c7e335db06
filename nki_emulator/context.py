"""Per-program state of a running kernel: on-chip capacity accounting, engine registers, cost counter, grid position.

One ``ProgramContext`` exists per program of a launch (``kernel[2]`` runs two, one per NeuronCore, each with its own
SBUF/PSUM). Code that allocates outside any kernel (tests, a REPL) gets a default context.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from . import dtypes, targets
from .cost import CostCounter
from .errors import NkiEmulatorError, check
from .hardware import (
    PMAX,
    PSUM_BANK_BYTES,
    PSUM_NUM_BANKS,
    PSUM_PARTITION_BYTES,
    SBUF_PARTITION_BYTES,
    SBUF_PARTITION_BYTES_PHYSICAL,
)
from .tensor import HBM, MemoryRegion, NkiTensor, Storage

QUADRANT = 32  # partitions per quadrant: engines start at partition 0/32/64/96 (nc_stream_shuffle doc, isa docs)
SBUF_AREA = PMAX * SBUF_PARTITION_BYTES  # usable partition-bytes of one trn2 core's SBUF


def _sbuf_bytes() -> tuple[int, str]:
    """Usable SBUF bytes per partition of the current target, and where the figure comes from."""
    t = targets.current()
    if t.name == "trn2":
        return SBUF_PARTITION_BYTES, "limits.SBUF_PARTITION_BYTES: 224 KiB minus the compiler's reserve"
    return (
        t.sbuf_partition_bytes,
        f"{t.name}: {t.sbuf_partition_bytes_physical // 1024} KiB minus the compiler's reserve",
    )


PSUM_CELLS = PSUM_NUM_BANKS * (PMAX // QUADRANT)  # PSUM in (bank, quadrant) cells: 8 banks x 4 quadrants


class MemoryTracker:
    """SBUF and PSUM capacity of one program, checked over the tiles' live ranges when the program ends.

    Accounting model (docs/emulator.md, "On-chip memory"):
    - A tile is live from its first to its last access (instruction clock, ``tensor.CLOCK``): what the compiler's
      allocator sees in a fully unrolled kernel. A tile allocated in a loop is not charged while the previous
      iteration's tile (dead, but still bound to a Python name) is; tiles never accessed cost nothing.
    - SBUF: a tile ``[P, f...]`` occupies ``prod(f) * itemsize`` bytes on ``ceil(P / 32) * 32`` partitions (whole
      quadrants); the check is the live partition-bytes against 128 x the usable bytes per partition (the allocator
      may place tiles on fewer partitions side by side), and each tile alone within the usable bytes per partition.
    - PSUM: a tile occupies a whole 2 KiB bank (accumulation groups are bank-granular) on its quadrants; at most
      8 banks x 4 quadrants are live.
    - ``address=(partition, byte offset)`` placements are views of the program's byte-addressed SBUF / PSUM
      (``_placed``): overlapping placements share bytes as on hardware. Every handle at the same placement with the
      same footprint is one allocation (one live range, charged once); PSUM placements are charged per (bank,
      quadrant) they touch.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.records: list[list] = []
        self.placements: dict[tuple, Storage] = {}
        self.peak_sbuf_bytes = 0
        self.peak_psum_banks = 0
        self._arenas: dict[MemoryRegion, np.ndarray] = {}

    def arena(self, buffer: MemoryRegion, row_bytes: int) -> np.ndarray:
        """The program's byte-addressed SBUF or PSUM (allocated on the first ``address=`` tile)."""
        a = self._arenas.get(buffer)
        if a is None:
            a = self._arenas[buffer] = np.full(PMAX * row_bytes, 0xFF, dtype=np.uint8)
        return a

    def allocate(self, tensor: NkiTensor, address=None) -> Storage | None:
        """Check the tile's static limits and start tracking it; returns an existing storage the tile aliases."""
        buf = tensor.buffer
        if buf not in (MemoryRegion.sbuf, MemoryRegion.psum):
            check(address is None, f"nl.ndarray({tensor.describe()})", f"address={address!r}; only SBUF and PSUM")
            return None
        p = tensor.shape[0]
        per_partition = tensor.free_size * tensor.dtype.itemsize
        sbuf = buf is MemoryRegion.sbuf
        usable, basis = _sbuf_bytes()
        if not (p <= PMAX and per_partition <= (usable if sbuf else PSUM_BANK_BYTES)):
            where = f"nl.ndarray({tensor.describe()})"
            check(
                p <= PMAX,
                where,
                f"partition dim={p}; exceeds pmax={PMAX} (tiling-overview.rst, Tile-Size Constraint #1)",
            )
            check(
                not sbuf,
                where,
                f"SBUF bytes per partition={per_partition}; exceeds the usable {usable} B per partition ({basis})",
            )
            raise NkiEmulatorError(
                f"{where}: PSUM bytes per partition={per_partition}; exceeds one {PSUM_BANK_BYTES} B bank "
                "(tiling-overview.rst, Tile-Size Constraint #2: psum_bank_fmax=512 fp32)"
            )
        placement = None
        if address is not None:
            where = f"nl.ndarray({tensor.describe()})"
            placement = self._placement(tensor, address, per_partition, where)
            key = (buf, placement[0], placement[2])
            old = self.placements.get(key)
            if old is not None and old.span[6] == placement:
                return old  # same placement, same footprint: the new handle aliases the old one
        if not self.enabled:
            return None
        q0 = 0 if placement is None else placement[0] // QUADRANT
        q1 = -(-(p if placement is None else placement[1]) // QUADRANT)
        if buf is MemoryRegion.sbuf:
            area, cells = (q1 - q0) * QUADRANT * per_partition, None
        elif placement is None:
            area, cells = q1 - q0, None
        else:
            b0, b1 = placement[2] // PSUM_BANK_BYTES, (placement[3] - 1) // PSUM_BANK_BYTES
            cells = tuple((b, q) for b in range(b0, b1 + 1) for q in range(q0, q1))
            area = len(cells)
        # [first access, last access, buffer, area, cells, (name, shape, dtype), placement]
        record = [-1, -1, buf, area, cells, (tensor.name, tensor.shape, tensor.dtype.name), placement]
        tensor._storage.span = record
        self.records.append(record)
        if placement is not None:
            self.placements[(buf, placement[0], placement[2])] = tensor._storage
        return None

    @staticmethod
    def _placement(tensor: NkiTensor, address, per_partition: int, where: str) -> tuple[int, int, int, int]:
        """(first partition, end partition, first byte, end byte) of an ``address=(partition, byte)`` tile."""
        try:
            p0, off = (int(a) for a in address)
        except (TypeError, ValueError):
            raise NkiEmulatorError(
                f"{where}: address={address!r}; must be (partition_offset, free_offset) "
                "(nki.language.ndarray doc, 'address')"
            ) from None
        p1, end = p0 + tensor.shape[0], off + per_partition
        check(
            0 <= p0 and p1 <= PMAX,
            where,
            f"address={address!r}: partitions [{p0}, {p1}); must lie within [0, {PMAX}) (tiling-overview.rst #1)",
        )
        if tensor.buffer is MemoryRegion.sbuf:
            check(
                0 <= off and end <= _sbuf_bytes()[0],
                where,
                f"address={address!r}: bytes [{off}, {end}); must lie within the usable {_sbuf_bytes()[0]} B "
                "per partition (limits.SBUF_PARTITION_BYTES)",
            )
        else:
            check(
                0 <= off
                and end <= PSUM_NUM_BANKS * PSUM_BANK_BYTES
                and off // PSUM_BANK_BYTES == (end - 1) // PSUM_BANK_BYTES,
                where,
                f"address={address!r}: bytes [{off}, {end}); a PSUM tile must lie within one {PSUM_BANK_BYTES} B "
                f"bank of the {PSUM_NUM_BANKS} (tiling-overview.rst, Tile-Size Constraint #2)",
            )
        return (p0, p1, off, end)

    def finish(self, where: str) -> None:
        """Sweep the live ranges: record the peaks and reject a program whose live tiles exceed SBUF or PSUM."""
        if not self.enabled or not self.records:
            return
        used = [r for r in self.records if r[0] >= 0]
        events = []
        for r in used:
            events.append((r[0], 1, r))
            events.append((r[1] + 1, 0, r))
        events.sort(key=lambda e: (e[0], e[1]))
        sbuf = psum = 0
        cells: dict[tuple, int] = {}
        live: set[int] = set()
        peak_sbuf = peak_psum = 0
        for t, add, r in events:
            sign = 1 if add else -1
            if add:
                live.add(id(r))
            else:
                live.discard(id(r))
            if r[2] is MemoryRegion.sbuf:
                sbuf += sign * r[3]
                peak_sbuf = max(peak_sbuf, sbuf)
                if add and sbuf > PMAX * _sbuf_bytes()[0]:
                    self._fail(where, "sbuf", t, used, live, sbuf)
            else:
                if r[4] is None:
                    psum += sign * r[3]
                else:
                    for c in r[4]:
                        n = cells.get(c, 0) + sign
                        if n:
                            cells[c] = n
                        else:
                            del cells[c]
                total = psum + len(cells)
                peak_psum = max(peak_psum, total)
                if add and total > PSUM_CELLS:
                    self._fail(where, "psum", t, used, live, total)
        self.peak_sbuf_bytes = max(self.peak_sbuf_bytes, -(-peak_sbuf // PMAX))
        self.peak_psum_banks = max(self.peak_psum_banks, -(-peak_psum // (PMAX // QUADRANT)))

    @staticmethod
    def _label(r: list) -> str:
        name, shape, dt = r[5]
        at = "" if r[6] is None else f" at address=({r[6][0]}, {r[6][2]})"
        return f"{name or 'tensor'}{list(shape)} {dt}@{r[2].value}{at}"

    def _fail(self, where: str, kind: str, t: int, used: list, live: set, total: int) -> None:
        tiles = sorted((r for r in used if id(r) in live and r[2].value == kind), key=lambda r: -r[3])
        listed = ", ".join(self._label(r) for r in tiles[:4]) + (", ..." if len(tiles) > 4 else "")
        if kind == "sbuf":
            usable, basis = _sbuf_bytes()
            raise NkiEmulatorError(
                f"{where}: SBUF bytes per partition={-(-total // PMAX)} at instruction #{t} ({len(tiles)} live tiles: "
                f"{listed}); exceeds the usable {usable} B per partition ({basis}; live = first to last access)"
            )
        banks = total / (PMAX // QUADRANT)
        raise NkiEmulatorError(
            f"{where}: live PSUM banks={banks:g} at instruction #{t} ({len(tiles)} live tiles: {listed}); exceeds the "
            f"{PSUM_NUM_BANKS} banks per partition (tile_size.psum_num_banks; a tile holds a whole bank on its "
            "quadrants; live = first to last access)"
        )


class ProgramContext:
    """State of one program (one NeuronCore) of a kernel launch."""

    def __init__(self, program_id: int = 0, num_programs: int = 1, launch: Launch | None = None) -> None:
        self.program_id = program_id
        self.num_programs = num_programs
        # nl.shared_hbm tensors are one tensor for all programs of a launch: the j-th shared_hbm allocation of
        # every program maps to the same storage (``launch.shared`` is the launch-wide list).
        self.launch = launch
        self.shared = None if launch is None else launch.shared
        self.shared_index = 0
        self.memory = MemoryTracker(enabled=launch is not None)
        self.cost = CostCounter()
        # Scalar Engine reduce registers (nisa.activation doc: one 32-bit register per lane, 128 lanes) and the
        # Vector Engine accumulator registers (tensor_scalar_cumulative doc). Unset registers read as NaN.
        self.act_regs = np.full(PMAX, np.nan, dtype=np.float32)
        self.sendrecv_seq: dict[tuple, int] = {}  # sequence numbers of sendrecv messages per (pipe, from, to)
        self.collective_seq = 0  # this program's collectives so far (the n-th meets the other ranks' n-th)
        self.in_no_reorder = 0  # depth of nl.no_reorder() blocks (fori_loop / while_loop may not sit inside)
        self.vec_regs = np.full(PMAX, np.nan, dtype=np.float32)


class PartnerFailed(NkiEmulatorError):
    """Raised in a program waiting at a barrier or sendrecv for a partner program that failed."""


class Launch:
    """State shared by the programs of one launch (``kernel[n]``), which run concurrently, one thread each, as the
    NeuronCores of a logical core do: the shared-HBM tensors, the ``core_barrier`` barrier and the ``sendrecv``
    mailboxes (the official simulator also runs LNC=2 as two threads: research/nki.md 3.1).

    Waits have no time limit: a waiting program is woken when its partner fails or finishes without arriving (then
    the wait can never end: reported as a deadlock), so slow programs never time out.
    """

    def __init__(self, num_programs: int, world=None, rank: int = 0) -> None:
        self.num_programs = num_programs
        self.world = world  # collectives.World of the ranks this launch is one of (None: a one-rank run)
        self.rank = rank
        self.shared: list[Storage] = []
        self.lock = threading.Lock()
        self.cond = threading.Condition()
        self.mailbox: dict[tuple, list] = {}
        self.failed = False
        self.finished = 0  # programs that returned (or failed)
        self._arrived = 0
        self._generation = 0
        self._arrival_times: dict[int, list[float]] = {}  # per barrier generation

    def abort(self) -> None:
        """Wake every waiting program (one program failed)."""
        with self.cond:
            self.failed = True
            self.cond.notify_all()

    def program_done(self) -> None:
        with self.cond:
            self.finished += 1
            self.cond.notify_all()

    def barrier(self, where: str, program_id: int, time: float = 0.0) -> float:
        """Block until every program of the launch reaches a barrier; returns the latest arrival ``time`` (the cost
        model's time at which each program reached it), when all of them may go on."""
        with self.cond:
            gen = self._generation
            self._arrival_times.setdefault(gen, []).append(time)
            self._arrived += 1
            if self._arrived == self.num_programs:
                self._arrived = 0
                self._generation += 1
                self.cond.notify_all()
                return max(self._arrival_times[gen])
            while self._generation == gen:
                self._check_partner(where, program_id, "the barrier")
                self.cond.wait()
            return max(self._arrival_times[gen])

    def wait_for(self, predicate, where: str, program_id: int, what: str) -> None:
        """Block (holding ``cond``) until ``predicate()``; the caller holds ``self.cond``."""
        while not predicate():
            self._check_partner(where, program_id, what)
            self.cond.wait()

    def _check_partner(self, where: str, program_id: int, what: str) -> None:
        if self.failed:
            raise PartnerFailed(f"{where}: program {program_id} waited at {what}; its partner program failed")
        if self.finished > 0:
            raise NkiEmulatorError(
                f"{where}: program {program_id} waits at {what}, but a partner program finished without reaching it; "
                "on hardware the core would wait forever (deadlock)"
            )


_DEFAULT = ProgramContext()
_local = threading.local()


def current() -> ProgramContext:
    """The running program's context (or the default one outside kernels); one per thread."""
    return getattr(_local, "ctx", _DEFAULT)


def set_current(ctx: ProgramContext | None) -> ProgramContext:
    """Install ``ctx`` (None: the default) for this thread and return the previous context."""
    prev = getattr(_local, "ctx", _DEFAULT)
    _local.ctx = _DEFAULT if ctx is None else ctx
    return prev


def allocate(shape, dtype, buffer, name: str = "", fill=None, address=None) -> NkiTensor:
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
        with ctx.launch.lock:  # programs run concurrently: the j-th allocation is created once
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
            t = _fresh(shape, dt, buffer, name, fill, ctx, address)
            ctx.shared.append(t._storage)
            return t
    return _fresh(shape, dt, buffer, name, fill, ctx, address)


def _fresh(shape, dt, buffer, name, fill, ctx, address) -> NkiTensor:
    if address is not None and buffer in (MemoryRegion.sbuf, MemoryRegion.psum):
        probe = NkiTensor(shape, dt, Storage(np.empty(0, dtype=dt), buffer, name, shape))
        alias = ctx.memory.allocate(probe, address)
        if alias is not None:
            return NkiTensor(shape, dt, alias, _strides=_arena_strides(shape, dt, buffer))
    else:
        probe = None
    span = None if probe is None else probe._storage.span
    if span is not None and span[6] is not None:
        t = _placed(shape, dt, buffer, name, ctx, span[6])
        t._storage.span = span
        ctx.memory.placements[(buffer, span[6][0], span[6][2])] = t._storage
        return t
    if fill is None:
        fill = np.nan if dtypes.is_float(dt) else dtypes.INT_FRESH_SENTINEL
    data = np.empty(math.prod(shape), dtype=dt)
    data[...] = dtypes.convert(np.asarray(fill, dtype=np.float32), dt) if dtypes.is_float(dt) else fill
    storage = Storage(data, buffer, name, shape)
    t = NkiTensor(shape, dt, storage)
    if probe is None:
        ctx.memory.allocate(t, address)
    else:  # already checked and recorded through the probe: move its record to the real storage
        storage.span = probe._storage.span
        if storage.span is not None and storage.span[6] is not None:
            ctx.memory.placements[(buffer, storage.span[6][0], storage.span[6][2])] = storage
    return t


ARENA_ROW_BYTES = {MemoryRegion.sbuf: SBUF_PARTITION_BYTES_PHYSICAL, MemoryRegion.psum: PSUM_PARTITION_BYTES}


def _placed(shape, dt, buffer, name, ctx, placement) -> NkiTensor:
    """A tile at an explicit ``address=``: a view of the program's byte-addressed SBUF/PSUM, so placements that
    overlap share their bytes as on hardware (a new handle reads what is there; fresh memory is 0xFF bytes: NaN for
    floats, -1 for signed integers)."""
    p0, p1, off, _end = placement
    isz = dt.itemsize
    check(
        off % isz == 0,
        f"nl.ndarray(name={name!r})",
        f"address byte offset={off}; must be a multiple of the {isz}-byte element size",
    )
    row = ARENA_ROW_BYTES[buffer]
    arena = ctx.memory.arena(buffer, row)
    free = math.prod(shape[1:])
    start = p0 * row + off
    data = arena[start : start + (p1 - p0 - 1) * row + free * isz].view(dt)
    storage = Storage(data, buffer, name, shape)
    storage.row_bytes = row
    return NkiTensor(shape, dt, storage, _strides=_arena_strides(shape, dt, buffer))


def _arena_strides(shape, dt, buffer) -> tuple[int, ...]:
    """Element strides of a placed tile: partitions one arena row apart, free dims row-major."""
    free_strides, acc = [], 1
    for n in reversed(shape[1:]):
        free_strides.append(acc)
        acc *= n
    return (ARENA_ROW_BYTES[buffer] // dt.itemsize, *reversed(free_strides))


def _as_buffer(buffer) -> MemoryRegion:
    if isinstance(buffer, MemoryRegion):
        return buffer
    raise NkiEmulatorError(
        f"nl.ndarray: buffer={buffer!r}; use nl.sbuf, nl.psum, nl.hbm, nl.private_hbm or "
        "nl.shared_hbm (string buffer names are not accepted since NKI 0.3)"
    )


def is_hbm(buffer) -> bool:
    return buffer in HBM
