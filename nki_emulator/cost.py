"""Instruction counting and the trn2 (NeuronCore-v3) cost model that turns counts into an estimated time.

Model (one kernel call, per physical NeuronCore):
- Every instruction occupies its engine for ``max(MIN_II_CYCLES, work_cycles)`` engine cycles, the estimate the
  NKI docs give for a single instruction (``nki.api.shared.rst``, "Estimated cycles": ``max(MIN_II, N)``,
  "MIN_II is roughly 64 engine cycles"; the perf guide also says instructions carry a ~64-cycle fixed overhead).
- ``work_cycles``: Tensor = moving free size N (one moving column per cycle, 128x128 PE array) x a dtype factor;
  Vector/Scalar/GpSimd = elements / engine data-path width (elements per cycle).
- DMA: bytes / per-core DMA bandwidth, HBM bytes / per-core HBM bandwidth (whichever is slower), plus a fixed
  descriptor-generation cost per DMA instruction spread over the DMA queues.
- Engines and DMA run concurrently (trainium2_arch.rst: engines run in parallel), but an instruction starts only
  when its engine is free and the data it reads is written (and, on chip, when the tile it overwrites has been read
  and written by the instructions before it). ``Timeline`` schedules every instruction that way in program order,
  each engine in order (an engine executes its instruction stream in order), the DMA on 16 queues sharing one
  core's bandwidth; the estimate is when the last instruction ends (the slowest program of a launch grid; a
  ``core_barrier`` or ``sendrecv`` waits for the partner's time). Dependencies are tracked per allocation: a tile
  allocated anew in each loop iteration is a new buffer (the compiler's allocator renames it, as far as the SBUF /
  PSUM capacity checks allow); HBM tensors are one allocation each, written parts ordered as a whole (only
  read-after-write is tracked there). Not modelled: engine pipeline latency, semaphore wait cost, queue assignment
  and DMA latency beyond the descriptor cost. ``busy_seconds`` keeps the busiest engine's total, the bound with
  perfect overlap (``engine_bound_seconds``); the estimate is never below it.
- Rooflines: HBM roofline = HBM bytes / per-core HBM bandwidth; PE roofline = MACs / (128 x 128 MACs per cycle x
  Tensor clock).
"""

from __future__ import annotations

import bisect
import dataclasses
import weakref
from collections import defaultdict

from . import targets
from .hardware import PE_COLS, PE_ROWS, PMAX
from .tensor import CLOCK, MemoryRegion, take_accesses

# --- Constants. Per-target hardware numbers (clocks, data-path widths, bandwidths, queues) live once, with their
# sources, in targets.py; the cost functions read the current target. These names are trn2's, for callers that
# quote them. --------------------------------------------------------------------------------------------------------
TENSOR_CLOCK_HZ = targets.TRN2.tensor_hz
VECTOR_CLOCK_HZ = targets.TRN2.vector_hz
SCALAR_CLOCK_HZ = targets.TRN2.scalar_hz
HBM_BYTES_PER_S_PER_CORE = targets.TRN2.hbm_bytes_per_s_per_core
VECTOR_RECIPROCAL_SLOWDOWN = 8  # nki.api.shared.rst: Vector reciprocal costs max(MIN_II, 8*N)
MIN_II_CYCLES = 64  # nki.api.shared.rst, "MIN_II is roughly 64 engine cycles"
# Tensor Engine: one moving column per cycle for bf16/fp16/fp8; fp32 runs 4x slower (trn2: 79 vs 20 TFLOPS,
# trainium2_arch.rst; trn1: 190 vs 47.5 per chip, trainium.rst); FP8 double_row packs two rows per PE (2x faster).
TENSOR_FP32_SLOWDOWN = 4
TENSOR_DOUBLE_ROW_SPEEDUP = 2
# ~600 ns per DMA instruction to generate descriptors (research/nki.md 2.1, DGE); issued on the queues in parallel.
DMA_FIXED_SECONDS = 600e-9

ENGINES = ("tensor", "vector", "scalar", "gpsimd", "dma")


def clocks() -> dict[str, float]:
    """Engine clocks of the current target (Hz)."""
    t = targets.current()
    return {"tensor": t.tensor_hz, "vector": t.vector_hz, "scalar": t.scalar_hz, "gpsimd": t.gpsimd_hz}


ON_CHIP = (MemoryRegion.sbuf, MemoryRegion.psum)


class BusyIntervals:
    """When a shared resource (a core's DMA bandwidth) is busy: sorted, disjoint, merged intervals. A transfer fills
    the free time from its ready time on, gap by gap, until its duration is used (the 16 DMA queues share the
    bandwidth, so a transfer ready earlier is not held behind one that waits for its data)."""

    EPS = 1e-15

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def place(self, ready: float, duration: float) -> float:
        """Use ``duration`` of free time at or after ``ready``; returns when the last of it ends."""
        starts, ends = self.starts, self.ends
        t, remaining = ready, duration
        i = bisect.bisect_right(ends, t)
        while True:
            if i < len(starts) and starts[i] <= t + self.EPS:  # inside a busy interval: skip to its end
                t = max(t, ends[i])
                i += 1
                continue
            gap_end = starts[i] if i < len(starts) else float("inf")
            take = min(remaining, gap_end - t)
            self._mark(i, t, t + take)
            remaining -= take
            t += take
            if remaining <= self.EPS:
                return t
            i = bisect.bisect_left(ends, t - self.EPS)

    def _mark(self, i: int, a: float, b: float) -> None:
        """Insert busy [a, b] before interval i (a >= ends[i - 1], b <= starts[i]), merging with touching ones."""
        starts, ends = self.starts, self.ends
        left = i > 0 and ends[i - 1] >= a - self.EPS
        right = i < len(starts) and starts[i] <= b + self.EPS
        if left and right:
            ends[i - 1] = ends[i]
            del starts[i], ends[i]
        elif left:
            ends[i - 1] = b
        elif right:
            starts[i] = a
        else:
            starts.insert(i, a)
            ends.insert(i, b)


class Timeline:
    """When each instruction of one program runs: in program order, on its engine, after its dependencies.

    ``ready[storage]``: when the last write to it ends; ``read_end[storage]``: when the last read of it ends (an
    on-chip tile may be overwritten only after that). ``floor``: nothing starts before it (after a barrier).
    """

    def __init__(self) -> None:
        self.engine_free: dict[str, float] = defaultdict(float)
        self.queue_free = [0.0] * targets.current().dma_queues_per_core
        self.pipe = BusyIntervals()  # the core's DMA/HBM bandwidth, one transfer at a time
        self.ready: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.read_end: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.floor = 0.0
        self.end = 0.0

    def _deps(self, accesses, after: float) -> float:
        start = max(self.floor, after)
        for storage, write in accesses:
            if not write:  # read after write
                start = max(start, self.ready.get(storage, 0.0))
            elif storage.buffer in ON_CHIP:  # write after write / after read of the same tile
                start = max(start, self.ready.get(storage, 0.0), self.read_end.get(storage, 0.0))
        return start

    def _retire(self, accesses, end: float) -> None:
        for storage, write in accesses:
            if write:
                self.ready[storage] = end
            else:
                self.read_end[storage] = max(self.read_end.get(storage, 0.0), end)
        self.end = max(self.end, end)

    def compute(self, engine: str, seconds: float) -> None:
        accesses = take_accesses()
        start = max(self.engine_free[engine], self._deps(accesses, 0.0))
        end = start + seconds
        self.engine_free[engine] = end
        self._retire(accesses, end)

    def dma(self, transfer_seconds: float, after: float = 0.0) -> None:
        """A DMA: descriptor generation on the earliest free queue, then the transfer on the core's bandwidth."""
        accesses = take_accesses()
        q = min(range(len(self.queue_free)), key=self.queue_free.__getitem__)
        start = max(self.queue_free[q], self._deps(accesses, after))
        end = self.pipe.place(start + DMA_FIXED_SECONDS, transfer_seconds)
        self.queue_free[q] = end
        self._retire(accesses, end)

    def collective(self, latency: float, transfer_seconds: float, after: float) -> None:
        """A collective: its hops' latency after ``after`` (the last rank's source ready), then its transfer on the
        core's bandwidth; no DMA queue (collectives have their own rings) and no compute engine."""
        accesses = take_accesses()
        start = self._deps(accesses, after)
        end = self.pipe.place(start + latency, transfer_seconds)
        self._retire(accesses, end)

    def ready_of(self, storage) -> float:
        return max(self.floor, self.ready.get(storage, 0.0))

    def sync(self, t: float) -> None:
        """After a barrier at time ``t``: every later instruction starts at or after it."""
        self.floor = max(self.floor, t)
        self.end = max(self.end, t)


class CostCounter:
    """Accumulates instructions of one program (one NeuronCore) of a kernel call."""

    def __init__(self) -> None:
        take_accesses()  # this program's thread starts with a clean access log
        self.timeline = Timeline()
        self.instructions: dict[str, int] = defaultdict(int)
        self.elements: dict[str, int] = defaultdict(int)
        self.cycles: dict[str, float] = defaultdict(float)
        self.by_op: dict[str, int] = defaultdict(int)
        self.dma_bytes = 0
        self.hbm_read_bytes = 0
        self.hbm_write_bytes = 0
        self.macs = 0

    def compute(self, engine: str, op: str, elements: int, work_cycles: float) -> None:
        """One compute instruction on ``engine`` processing ``elements`` elements in ``work_cycles`` cycles."""
        CLOCK[0] += 1
        self.instructions[engine] += 1
        self.elements[engine] += int(elements)
        cycles = max(MIN_II_CYCLES, work_cycles)
        self.cycles[engine] += cycles
        self.by_op[op] += 1
        self.timeline.compute(engine, cycles / clocks()[engine])

    def dma(self, op: str, nbytes: int, hbm_read: int, hbm_write: int, after: float = 0.0) -> None:
        """One DMA instruction moving ``nbytes`` bytes, of which ``hbm_read``/``hbm_write`` touch HBM; it starts no
        earlier than ``after`` (a partner core's data, for ``sendrecv``)."""
        CLOCK[0] += 1
        self.instructions["dma"] += 1
        self.elements["dma"] += int(nbytes)
        self.by_op[op] += 1
        self.dma_bytes += int(nbytes)
        self.hbm_read_bytes += int(hbm_read)
        self.hbm_write_bytes += int(hbm_write)
        t = targets.current()
        transfer = max(nbytes / t.dma_bytes_per_s_per_core, (hbm_read + hbm_write) / t.hbm_bytes_per_s_per_core)
        self.timeline.dma(transfer, after)

    def collective(self, op: str, nbytes: int, hbm_bytes: int, latency: float, transfer: float, after: float) -> None:
        """One collective moving ``nbytes`` of this core's data (``hbm_bytes`` of HBM traffic) over the ranks."""
        CLOCK[0] += 1
        self.by_op[op] += 1
        self.hbm_read_bytes += int(hbm_bytes) // 2
        self.hbm_write_bytes += int(hbm_bytes) - int(hbm_bytes) // 2
        self.timeline.collective(latency, transfer, after)

    def busy_seconds(self) -> dict[str, float]:
        t, hz = targets.current(), clocks()
        out = {e: self.cycles[e] / hz[e] for e in hz}
        n = self.instructions["dma"]
        out["dma"] = max(
            self.dma_bytes / t.dma_bytes_per_s_per_core,
            (self.hbm_read_bytes + self.hbm_write_bytes) / t.hbm_bytes_per_s_per_core,
        )
        out["dma"] += n * DMA_FIXED_SECONDS / t.dma_queues_per_core
        return out


# Engines process the partitions in parallel lanes (one lane per partition, PMAX lanes), so an instruction's work
# is its elements per partition times PMAX, divided by the data-path width: a [1, F] tile costs as much as [128, F].
def vector_cycles(free_elems: int, all_16bit: bool) -> float:
    t = targets.current()
    return free_elems * PMAX / (t.vector_elems_16bit if all_16bit else t.vector_elems)


def scalar_cycles(free_elems: int) -> float:
    return free_elems * PMAX / targets.current().scalar_elems


def gpsimd_cycles(free_elems: int) -> float:
    return free_elems * PMAX / targets.current().gpsimd_elems


@dataclasses.dataclass(frozen=True)
class CostReport:
    """Counts and trn2 time estimate of one kernel call (all programs of its launch grid).

    ``instructions``/``elements``/``busy_seconds`` are keyed by engine (tensor, vector, scalar, gpsimd, dma);
    ``elements["dma"]`` counts bytes. ``estimated_seconds`` is the slowest program's busiest engine.
    """

    instructions: dict
    elements: dict
    busy_seconds: dict
    ops: dict
    dma_bytes: int
    hbm_read_bytes: int
    hbm_write_bytes: int
    macs: int
    num_programs: int
    estimated_seconds: float
    engine_bound_seconds: float
    hbm_roofline_seconds: float
    pe_roofline_seconds: float
    peak_sbuf_bytes_per_partition: int
    peak_psum_banks: int

    @property
    def hbm_bytes(self) -> int:
        return self.hbm_read_bytes + self.hbm_write_bytes

    @property
    def bound_by(self) -> str:
        """The engine whose busy time sets the estimate."""
        return max(self.busy_seconds, key=self.busy_seconds.get)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hbm_bytes"] = self.hbm_bytes
        d["bound_by"] = self.bound_by
        return d

    def format(self) -> str:
        lines = [
            f"estimated {self.estimated_seconds * 1e6:9.2f} us (dependencies; {self.num_programs} program(s))",
            f"engines   {self.engine_bound_seconds * 1e6:9.2f} us (busiest engine, {self.bound_by}, perfect overlap)",
            f"HBM roofline {self.hbm_roofline_seconds * 1e6:9.2f} us  ({self.hbm_read_bytes} B read, "
            f"{self.hbm_write_bytes} B written)",
            f"PE roofline  {self.pe_roofline_seconds * 1e6:9.2f} us  ({self.macs} MACs)",
            f"peak SBUF {self.peak_sbuf_bytes_per_partition} B/partition, peak PSUM banks {self.peak_psum_banks}",
        ]
        for e in ENGINES:
            unit = "B" if e == "dma" else "elems"
            lines.append(
                f"  {e:7s} {self.instructions.get(e, 0):7d} instr {self.elements.get(e, 0):12d} {unit:5s} "
                f"busy {self.busy_seconds.get(e, 0.0) * 1e6:9.2f} us"
            )
        return "\n".join(lines)


def build_report(counters: list[CostCounter], peak_sbuf: int, peak_psum: int) -> CostReport:
    """Sum the programs' counts; the estimate is the slowest program (programs run on separate cores)."""
    instructions: dict[str, int] = {e: 0 for e in ENGINES}
    elements: dict[str, int] = {e: 0 for e in ENGINES}
    busy: dict[str, float] = {e: 0.0 for e in ENGINES}
    ops: dict[str, int] = defaultdict(int)
    estimated = engine_bound = 0.0
    for c in counters:
        b = c.busy_seconds()
        engine_bound = max(engine_bound, max(b.values()))
        estimated = max(estimated, c.timeline.end)
        for e in ENGINES:
            instructions[e] += c.instructions[e]
            elements[e] += c.elements[e]
            busy[e] = max(busy[e], b[e])
        for k, v in c.by_op.items():
            ops[k] += v
    n = max(1, len(counters))
    hbm_r = sum(c.hbm_read_bytes for c in counters)
    hbm_w = sum(c.hbm_write_bytes for c in counters)
    macs = sum(c.macs for c in counters)
    return CostReport(
        instructions=instructions,
        elements=elements,
        busy_seconds=busy,
        ops=dict(ops),
        dma_bytes=sum(c.dma_bytes for c in counters),
        hbm_read_bytes=hbm_r,
        hbm_write_bytes=hbm_w,
        macs=macs,
        num_programs=n,
        estimated_seconds=max(estimated, engine_bound),
        engine_bound_seconds=engine_bound,
        hbm_roofline_seconds=(hbm_r + hbm_w) / (targets.current().hbm_bytes_per_s_per_core * n),
        pe_roofline_seconds=macs / (PE_ROWS * PE_COLS * targets.current().tensor_hz * n),
        peak_sbuf_bytes_per_partition=peak_sbuf,
        peak_psum_banks=peak_psum,
    )
