"""Dense projections ``y = x @ W^T``: the fused q/k/v projection, the o projection, the dense SwiGLU MLP's two
matmuls and the vocabulary-parallel LM head of one tensor-parallel rank.

Decode multiplies a few token rows by a large weight, so the kernel is bound by reading the weight: it streams every
weight byte from HBM exactly once per call, whatever the token count, and accumulates in fp32 PSUM. The weight's
kernel layout is the transpose of ``nn.Linear``'s ``[N, K]``, i.e. ``W^T [K, N]`` contiguous, which partition p reads
as the F contiguous rows ``k = p * F .. p * F + F - 1`` (K = KP * F, F = ceil(K / 128) equal tiles of KP <= 128
rows: ``moe_common.split_tiles``, the split the MoE kernels use for H).
"""

import nki
import nki.isa as nisa
import nki.language as nl
import torch

from .grid import program_share
from .limits import GEMM_MOVING_FMAX, GEMM_STATIONARY_FMAX, SBUF_PARTITION_BYTES, require
from .moe_common import split_tiles
from .views import rows_over_partitions

N_TILE = GEMM_MOVING_FMAX  # output columns per matmul: the moving free size, one 2 KiB PSUM bank of fp32
ROWS_PER_TILE = GEMM_STATIONARY_FMAX  # tokens per matmul: the stationary free size
# Weight DMAs per column chunk: the chunk (up to 2 MiB at K = 2048 bf16) arrives in this many pieces so the matmuls
# of the first piece overlap the transfer of the rest; more pieces add DMA descriptor cost (600 ns each).
WEIGHT_DMAS_PER_CHUNK = 4


@nki.jit
def linear(x, weight_t):
    """``y = x @ weight_t``: one projection of one rank, the weight streamed once.

    Dimensions: T tokens, K = KP * F input features (F = ceil(K / 128) tiles of KP rows), N output features.

    Args:    x [T, K] bf16|fp32 HBM; weight_t [K, N] x's dtype HBM (``linear_kernel_layout``: ``nn.Linear``'s weight
             transposed).
    Returns: y [T, N] x's dtype, nl.shared_hbm.
    Grid:    ``linear[g]`` (LNC=2: g = 2) splits the N columns into g contiguous ranges, one per program (physical
             core), each reading its share of the weight; programs write disjoint columns of the shared output.
    Tiling:  x loaded once, K on partitions ([KP, T, F], k = p * F + f); then per column tile of N_TILE = 512: the
             weight chunk [KP, F, n] in WEIGHT_DMAS_PER_CHUNK DMAs of consecutive K tiles (each weight byte read
             once per call; a matmul waits only for its piece), and per token tile of 128:
             Tensor: F matmuls y[t, n] += x[:, t, f]^T @ w[:, f, n] accumulated in one PSUM bank (fp32); Vector:
             PSUM to SBUF rounded to x's dtype; one store.
    Limits:  x 2-D with T >= 1; weight_t [K, N] with x's dtype, N >= 1; K splits into ceil(K / 128) equal tiles;
             x and one weight chunk fit SBUF (T * F + F * 512 elements per partition).
    """
    where = "linear"
    require(len(x.shape) == 2, where, f"x.shape={tuple(x.shape)}; must be 2-D [T, K]")
    T, K = x.shape
    require(T >= 1, where, f"T={T}; must be >= 1")
    require(
        len(weight_t.shape) == 2 and weight_t.shape[0] == K and weight_t.shape[1] >= 1,
        where,
        f"weight_t.shape={tuple(weight_t.shape)}; must be [K={K}, N >= 1] (the weight transposed)",
    )
    require(
        weight_t.dtype == x.dtype,
        where,
        f"weight_t.dtype={weight_t.dtype}; must equal x.dtype={x.dtype} (matmul operands)",
    )
    KP, F = split_tiles(K, where, "K")
    N = weight_t.shape[1]
    item = getattr(x.dtype, "itemsize", 4)
    per_partition = (T * F + F * N_TILE + ROWS_PER_TILE) * item
    require(
        per_partition <= SBUF_PARTITION_BYTES,
        where,
        f"T={T}, K={K} need {per_partition} B of SBUF per partition; must fit {SBUF_PARTITION_BYTES} B",
    )
    y = nl.ndarray((T, N), dtype=x.dtype, buffer=nl.shared_hbm)
    xs = nl.ndarray((KP, T, F), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=xs, src=rows_over_partitions(x, 0, T, KP))
    w_all = weight_t.reshape((KP, F, N))
    first, last = program_share(N)  # this program's columns
    per_dma = -(-F // WEIGHT_DMAS_PER_CHUNK)  # K tiles per weight DMA
    for c0 in range(first, last, N_TILE):
        n = min(N_TILE, last - c0)
        pieces = []  # the chunk's weight in a few DMAs, so the first matmuls start before the whole chunk is in
        for f0 in range(0, F, per_dma):
            w = nl.ndarray((KP, min(per_dma, F - f0), n), dtype=weight_t.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=w, src=w_all[:, f0 : f0 + per_dma, c0 : c0 + n])
            pieces.append(w)
        for r0 in range(0, T, ROWS_PER_TILE):
            rows = min(ROWS_PER_TILE, T - r0)
            acc = nl.ndarray((rows, n), dtype=nl.float32, buffer=nl.psum)
            for f in range(F):
                w = pieces[f // per_dma]
                nisa.nc_matmul(
                    dst=acc, stationary=xs[:, r0 : r0 + rows, f], moving=w[:, f % per_dma, :], accumulate=f > 0
                )
            out = nl.ndarray((rows, n), dtype=x.dtype, buffer=nl.sbuf)
            nisa.tensor_copy(dst=out, src=acc)
            nisa.dma_copy(dst=y[r0 : r0 + rows, c0 : c0 + n], src=out)
    return y


def linear_kernel_layout(weight: torch.Tensor) -> torch.Tensor:
    """``nn.Linear``'s weight ``[N, K]`` as the kernel's ``weight_t [K, N]`` contiguous; a new tensor unless the
    weight is already stored column-major (then a view)."""
    return weight.t().contiguous()


def linear_ref(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """``x @ weight_t`` in fp32, rounded once to x's dtype (the kernel's PSUM accumulation)."""
    return (x.float() @ weight_t.float()).to(x.dtype)
