"""The hardware the cost model and the capacity checks describe: trn2 (NeuronCore-v3, the default) or trn1
(NeuronCore-v2). One table per target, each number with its source (aws-neuron/aws-neuron-sdk):

- trn2: ``nki/guides/architecture/trainium2_arch.rst`` ("Compute Engine Specifications": engine clocks and data-path
  widths; SBUF 28 MiB, 16 DMA engines per core), ``about-neuron/arch/neuron-hardware/trainium2.rst`` (8 cores per
  chip, HBM 2.9 TB/s, DMA 3.5 TB/s);
- trn1: ``nki/guides/architecture/trainium_inferentia2_arch.rst`` (Tensor 2.8 GHz; Vector 1.12 GHz, Scalar and
  GpSimd 1.4 GHz, each 128 elements per cycle in and out; SBUF 24 MiB = 192 KiB per partition, PSUM 2 MiB; 2 cores,
  HBM 820 GB/s, 32 DMA engines per device), ``about-neuron/arch/neuron-hardware/trainium.rst`` (1 TB/s of DMA
  bandwidth per chip; 190 BF16 and 47.5 FP32 TFLOPS per chip, so fp32 matmuls run 4x slower as on trn2).

What trn1 lacks, as the emulator enforces it: logical cores of two physical cores (LNC=2, hence ``core_barrier`` and
``sendrecv``: NeuronCore-v3 or newer, isa docs) and the FP8 ``double_row`` matmul mode (trn2's Tensor Engine).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

# The compiler's reserve per SBUF partition (nki-library's MAX_AVAILABLE_SBUF_SIZE = 224 KiB - 16 KiB - 8 - 256,
# hardware.py); assumed the same on trn1, whose docs give no figure.
SBUF_COMPILER_RESERVE = 16 * 1024 + 8 + 256


@dataclass(frozen=True)
class Target:
    name: str
    core: str
    tensor_hz: float
    vector_hz: float
    scalar_hz: float
    gpsimd_hz: float
    vector_elems_16bit: int  # Vector Engine elements per cycle with all-16-bit operands
    vector_elems: int  # ... other dtypes
    scalar_elems: int
    gpsimd_elems: int
    hbm_bytes_per_s_per_core: float
    dma_bytes_per_s_per_core: float
    dma_queues_per_core: int
    cores_per_chip: int
    logical_core_size: int  # physical cores per logical core by default (LNC)
    sbuf_partition_bytes_physical: int
    fp8_double_row: bool

    @property
    def sbuf_partition_bytes(self) -> int:
        """Usable SBUF bytes per partition (the physical size minus the compiler's reserve)."""
        return self.sbuf_partition_bytes_physical - SBUF_COMPILER_RESERVE


TRN2 = Target(
    name="trn2",
    core="NeuronCore-v3",
    tensor_hz=2.4e9,
    vector_hz=0.96e9,
    scalar_hz=1.2e9,
    gpsimd_hz=1.2e9,
    vector_elems_16bit=512,  # "512 BF16/FP16 input/output"
    vector_elems=256,  # "256 input/output for other data types"
    scalar_elems=128,
    gpsimd_elems=8 * 512 // 32,  # 8 cores with 512-bit SIMD: 8 x 16 fp32 lanes
    hbm_bytes_per_s_per_core=2.9e12 / 8,
    dma_bytes_per_s_per_core=3.5e12 / 8,
    dma_queues_per_core=16,
    cores_per_chip=8,
    logical_core_size=2,
    sbuf_partition_bytes_physical=224 * 1024,
    fp8_double_row=True,
)

TRN1 = Target(
    name="trn1",
    core="NeuronCore-v2",
    tensor_hz=2.8e9,
    vector_hz=1.12e9,
    scalar_hz=1.4e9,
    gpsimd_hz=1.4e9,
    vector_elems_16bit=128,  # "128 input/output" whatever the dtype
    vector_elems=128,
    scalar_elems=128,
    gpsimd_elems=128,
    hbm_bytes_per_s_per_core=820e9 / 2,
    dma_bytes_per_s_per_core=1e12 / 2,
    dma_queues_per_core=32 // 2,
    cores_per_chip=2,
    logical_core_size=1,
    sbuf_partition_bytes_physical=192 * 1024,
    fp8_double_row=False,
)

TARGETS = {t.name: t for t in (TRN2, TRN1)}
_current = [TRN2]


def current() -> Target:
    """The target the cost model and the capacity checks describe now (trn2 unless ``use`` says otherwise)."""
    return _current[0]


def get(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"target={name!r}; must be one of {', '.join(TARGETS)}")
    return TARGETS[name]


@contextlib.contextmanager
def use(name: str):
    """Within the block, kernels are checked and costed as on ``name`` (process-wide: the programs of a launch
    grid run in threads of the same process)."""
    previous = _current[0]
    _current[0] = get(name)
    try:
        yield _current[0]
    finally:
        _current[0] = previous
