"""The trn2 (NeuronCore-v3) hardware table the emulator enforces, each fact with its documentation source.

The emulator imports nothing of the project; the kernels keep their own copy of the facts they tile by
(``vllm_nki_moe.kernels.limits``), and ``tests/nki_emulator/test_hardware.py`` checks that the two agree.

Sources (aws-neuron/aws-neuron-sdk, docs for Neuron 2.32 / NKI 0.6):
- ``nki/get-started/about/tiling-overview.rst`` ("Tile-Size Constraint" #1 to #3);
- ``nki/guides/architecture/trainium2_arch.rst`` (SBUF 128 x 224 KiB, PSUM 2 MiB);
- ``nki/api/nki/isa/__init__.py`` (per-instruction limits in the docstrings of ``nc_matmul``, ``max8``, ...).
"""

# --- Partitions -------------------------------------------------------------------------------------------------
PMAX = 128  # partitions of SBUF and PSUM; dim 0 of an on-chip tile (tiling-overview.rst, Tile-Size Constraint #1)

# --- SBUF --------------------------------------------------------------------------------------------------------
SBUF_PARTITION_BYTES_PHYSICAL = 224 * 1024  # 28 MiB / 128 partitions (trainium2_arch.rst, "SBUF capacity")
# Usable bytes per partition: nki-library's budget (aws-neuron/nki-library, core/mlp/mlp_cte/mlp_cte_constants.py,
# MAX_AVAILABLE_SBUF_SIZE = 224 KiB - 16 KiB - 8 - 256): the compiler keeps 16 KiB per partition for itself (spills,
# semaphores, identity constants) plus a few bytes of alignment. We enforce this figure rather than the physical 224 KiB
# because a kernel that needs the reserved bytes would fail to allocate in the real compiler.
SBUF_PARTITION_BYTES = 224 * 1024 - 16 * 1024 - 8 - 256  # 212,728 B

# --- PSUM --------------------------------------------------------------------------------------------------------
PSUM_PARTITION_BYTES = 16 * 1024  # 2 MiB / 128 partitions (trainium2_arch.rst)
PSUM_BANK_BYTES = 2 * 1024  # one bank per partition = 512 fp32 (tile_size.psum_bank_fmax_bytes)
PSUM_NUM_BANKS = PSUM_PARTITION_BYTES // PSUM_BANK_BYTES  # 8 (tile_size.psum_num_banks)
PSUM_BANK_FMAX = PSUM_BANK_BYTES // 4  # 512 fp32 elements (tiling-overview.rst, Tile-Size Constraint #2)

# --- Tensor Engine (nc_matmul docstring, "Tile size"; tiling-overview.rst, Tile-Size Constraint #3) --------------
GEMM_CONTRACT_MAX = PMAX  # K on the partition axis of both operands
GEMM_STATIONARY_FMAX = 128  # M: free size of the stationary operand (tile_size.gemm_stationary_fmax)
GEMM_MOVING_FMAX = 512  # N: free size of the moving operand on NeuronCore-v2/v3 (tile_size.gemm_moving_fmax)
PE_ROWS = 128  # systolic array rows (nc_matmul docstring, "Tiling mode")
PE_COLS = 128  # systolic array columns

# --- Other instruction limits ------------------------------------------------------------------------------------
TOPK8 = 8  # max8 / nc_find_index8 produce exactly 8 values per partition (isa docstrings)
TOPK8_MIN_ELEMS = 8  # max8 / nc_find_index8: elements read per partition, at least (isa docstrings)
TOPK8_MAX_ELEMS = 16384  # ... and at most
NC_TRANSPOSE_TENSOR_MAX = 128  # nc_transpose on Tensor Engine: input up to [128, 128] (isa docstring)
NC_TRANSPOSE_VECTOR_MAX = 32  # nc_transpose on Vector Engine: input up to [32, 32] (isa docstring)
DMA_COMPUTE_MAX_SRCS = 16  # dma_compute: at most 16 source tensors (isa docstring)
ISA_PATTERN_MAX_DIMS = 4  # iota / affine_select patterns are up to 4-D (isa docstrings)
