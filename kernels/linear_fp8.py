"""Projections with block-scaled FP8 weights (FP8 checkpoints' q/k/v, o and dense MLP): ``y = x @ W^T`` for a weight
stored as FP8 with one fp32 scale per 128 x 128 block, weight-only (x stays bf16, or fp32 in the CPU test models).

Decode reads every weight byte once per call and does little else, so the FP8 bytes go straight into the Tensor
Engine as the stationary operand (half the bf16 bytes), x moving: each (output block, hidden block) pair gives one
PSUM column per token, and the block scale multiplies that column before the sum over hidden blocks (the scale is
one number per pair, so it cannot be folded into an accumulating matmul). trn2 takes ``float8_e4m3`` (IEEE-style),
not the checkpoints' ``float8_e4m3fn`` (NCC_EVRF051): the host conversion is ``moe_fp8.to_trn2_fp8`` (values halved,
scales doubled), as for the FP8 experts.

Layout (host-made, ``linear_fp8_kernel_layout``; the model's tensor shapes are kept so the op reads N and K from them).
K = KT * KP with KP = 128 (K a multiple of 128) or K < 128 (one tile, KP = K); N in NB = ceil(N / 128) output blocks
of NS <= 128 rows (the last may be partial):

- ``weight [N, K]`` uint8 (trn2 FP8 bytes): output block ``nb`` is the ``NS * K`` bytes from ``nb * 128 * K`` on,
  laid out ``[KP, KT, NS]``: byte ``(p, kt, q)`` of block ``nb`` is ``W[nb * 128 + q, kt * KP + p]``, so one DMA
  brings a block with KT * NS contiguous bytes per partition (2 KiB at K = 2048);
- ``scale [NB, KT]`` fp32: the checkpoint's ``weight_scale_inv`` doubled (one scale per 128 x 128 block).

Numerics: per (block, hidden tile) the fp32 PSUM column times its scale, summed over the hidden tiles in fp32, rounded
once to x's dtype. The reference (``ops.fp8.linear_fp8``) instead rounds the dequantized weight to x's dtype before an
fp32-accumulated matmul, as transformers does: equal for fp32 x, within bf16 rounding of the weights for bf16 x.
"""

import nki
import nki.isa as nisa
import nki.language as nl
import torch

from .grid import program_share
from .limits import PMAX, PSUM_BANK_FMAX, require
from .moe_common import DTYPES
from .moe_fp8 import to_trn2_fp8, trn2_fp8_values, widened
from .views import sbuf_view

BLOCK = PMAX  # the checkpoints' weight_block_size [128, 128]: one scale block is one partition tile
# x stays in SBUF for the whole call ([KP, KT, T]); a call takes at most this many bytes of it per partition, so the
# weight block, its fp32 widening and the scales always fit beside it (longer inputs: ``max_tokens`` per call).
X_SBUF_BYTES = 64 * 1024
# From this many tokens on, an output block is dequantized once in SBUF instead of scaling PSUM columns per token
# (the columns' Vector work grows as 2 * KT elements per token and block; the dequantization's is KT * NS per block
# whatever T). Where the two cross, by the cost model at Qwen3-30B-A3B TP 4's q/k/v (K 2048, N 1280) and o (K 1024,
# N 2048): between 32 tokens (columns faster) and 48 (dequantized faster), at both shapes.
DEQUANTIZE_MIN_TOKENS = 40


def _tiles(k: int, where: str) -> tuple[int, int]:
    """``(KP, KT)`` for contraction K: 128-row tiles (one per scale block), or one tile when K < 128."""
    require(k >= 1 and (k < BLOCK or k % BLOCK == 0), where, f"K={k}; must be < {BLOCK} or a multiple of {BLOCK}")
    return (k, 1) if k < BLOCK else (BLOCK, k // BLOCK)


@nki.jit
def linear_fp8(x, weight, scale):
    """``y = x @ W^T`` for one rank's block-scaled FP8 projection, the FP8 weight streamed once.

    Dimensions: T tokens, K = KT * KP input features, N = output features in NB blocks of NS <= 128.

    Args:    x [T, K] bf16|fp32 HBM; weight [N, K] uint8 HBM and scale [NB, KT] fp32 HBM in the kernel layout
             (``linear_fp8_kernel_layout``).
    Returns: y [T, N] x's dtype, nl.shared_hbm.
    Grid:    ``linear_fp8[g]`` (LNC=2: g = 2) splits the NB output blocks into g contiguous ranges, one per program;
             programs write disjoint columns of the shared output.
    Tiling:  x loaded once with K on partitions ([KP, KT, T], k = kt * KP + p); per output block one DMA
             [KP, KT, NS] (FP8), then by T:
             T < DEQUANTIZE_MIN_TOKENS (decode): the block's scales broadcast by the DMA ([NS, TT, KT], stride 0
             over partitions and tokens); per token tile of TT = min(T, 512 // KT) tokens: Tensor: KT matmuls, FP8
             stationary [KP, NS] against x moving [KP, TT], each writing columns [NS, TT] (stride KT) of one PSUM
             tile [NS, TT, KT]; Vector: times the scales, summed over kt (fp32, the innermost axis), rounded to x's
             dtype. fp32 x cannot meet FP8 operands in the Tensor Engine: its weight tiles are widened first.
             T >= DEQUANTIZE_MIN_TOKENS (prefill): Vector: the block times its scales ([KP, KT] by DMA, seen as
             [KP, KT, NS] with step 0) in x's dtype, once; per token tile of up to 512: Tensor: KT matmuls
             accumulating [NS, TT] in one PSUM bank; rounded to x's dtype.
             Each token tile ends with one store of [TT, NS] (columns nb * 128 ..).
    Limits:  x 2-D, 1 <= T <= ``max_tokens(K, itemsize)`` (x's X_SBUF_BYTES per partition), bf16 or fp32; K < 128 or
             a multiple of 128 with KT <= 512 (a token's PSUM columns fit one bank); weight uint8 [N, K]; scale fp32
             [ceil(N / 128), KT].
    """
    where = "linear_fp8"
    require(len(x.shape) == 2, where, f"x.shape={tuple(x.shape)}; must be 2-D [T, K]")
    T, K = x.shape
    require(T >= 1, where, f"T={T}; must be >= 1")
    require(x.dtype in DTYPES, where, f"x.dtype={x.dtype}; must be bfloat16 or float32")
    KP, KT = _tiles(K, where)
    require(KT <= PSUM_BANK_FMAX, where, f"K={K}: KT={KT} hidden tiles; at most {PSUM_BANK_FMAX} (one PSUM bank)")
    require(
        len(weight.shape) == 2 and weight.shape[1] == K and weight.shape[0] >= 1 and weight.dtype == nl.uint8,
        where,
        f"weight {tuple(weight.shape)} {weight.dtype}; must be uint8 [N >= 1, K={K}] (trn2 FP8 bytes, kernel layout)",
    )
    N = weight.shape[0]
    NB = -(-N // BLOCK)
    require(
        tuple(scale.shape) == (NB, KT) and scale.dtype == nl.float32,
        where,
        f"scale {tuple(scale.shape)} {scale.dtype}; must be float32 [{NB}, {KT}] (one per 128 x 128 block)",
    )
    item = 4 if x.dtype == nl.float32 else 2
    require(
        T <= max_tokens(K, item),
        where,
        f"T={T}, K={K}: x needs {T * KT * item} B of SBUF per partition; at most {X_SBUF_BYTES} B "
        f"(T <= {max_tokens(K, item)}; call per token tile)",
    )
    dt = x.dtype
    y = nl.ndarray((T, N), dtype=dt, buffer=nl.shared_hbm)
    w8 = weight.view(nl.float8_e4m3)

    xs = nl.ndarray((KP, KT, T), dtype=dt, buffer=nl.sbuf)
    nisa.dma_copy(dst=xs, src=x.ap([[1, KP], [KP, KT], [K, T]], offset=0))
    first, last = program_share(NB)
    for nb in range(first, last):
        ns = min(BLOCK, N - nb * BLOCK)
        w_sb = nl.ndarray((KP, KT, ns), dtype=nl.float8_e4m3, buffer=nl.sbuf)
        nisa.dma_copy(dst=w_sb, src=w8.ap([[KT * ns, KP], [ns, KT], [1, ns]], offset=nb * BLOCK * K))
        if T >= DEQUANTIZE_MIN_TOKENS:
            _block_dequantized(y, xs, w_sb, scale, nb, ns, T, KP, KT)
        else:
            _block_scaled_columns(y, xs, w_sb, scale, nb, ns, T, KT)
    return y


def _block_scaled_columns(y, xs, w_sb, scale, nb: int, ns: int, T: int, KT: int) -> None:
    """Output block ``nb`` for few tokens: the FP8 tile stationary, one PSUM column per (token, hidden tile), times
    its scale, summed over the hidden tiles (Vector work grows with T * KT)."""
    N, dt = y.shape[1], xs.dtype
    TT = min(T, PSUM_BANK_FMAX // KT)  # tokens per PSUM tile [NS, TT, KT]
    w_mm = widened(w_sb, dt)
    for t0 in range(0, T, TT):
        tt = min(TT, T - t0)
        s_sb = nl.ndarray((ns, tt, KT), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=s_sb, src=scale.ap([[0, ns], [0, tt], [1, KT]], offset=nb * KT))
        cols = nl.ndarray((ns, tt, KT), dtype=nl.float32, buffer=nl.psum)  # kt innermost: reduced last
        for kt in range(KT):
            nisa.nc_matmul(dst=cols[:, :, kt], stationary=w_mm[:, kt, :], moving=xs[:, kt, t0 : t0 + tt])
        scaled = nl.ndarray((ns, tt, KT), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=scaled, data1=cols, data2=s_sb, op=nl.multiply)
        acc = nl.ndarray((ns, tt), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=acc, op=nl.add, data=scaled, axis=2)
        out = nl.ndarray((ns, tt), dtype=dt, buffer=nl.sbuf)
        nisa.tensor_copy(dst=out, src=acc)
        nisa.dma_copy(dst=y.ap([[1, ns], [N, tt]], offset=t0 * N + nb * BLOCK), src=out)


def _block_dequantized(y, xs, w_sb, scale, nb: int, ns: int, T: int, KP: int, KT: int) -> None:
    """Output block ``nb`` for many tokens: the FP8 tile times its scales once, in x's dtype (Vector work KT * NS per
    partition whatever T), then KT matmuls accumulating in one PSUM tile [NS, TT] per token tile of TT <= 512."""
    N, dt = y.shape[1], xs.dtype
    s_sb = nl.ndarray((KP, KT), dtype=nl.float32, buffer=nl.sbuf)  # block (nb, kt)'s scale on every partition
    nisa.dma_copy(dst=s_sb, src=scale.ap([[0, KP], [1, KT]], offset=nb * KT))
    w_dq = nl.ndarray((KP, KT, ns), dtype=dt, buffer=nl.sbuf)  # rounded to x's dtype, as the reference rounds
    # the scales seen as [KP, KT, NS] (step 0 over NS): one instruction for the whole block
    nisa.tensor_tensor(dst=w_dq, data1=w_sb, data2=sbuf_view(s_sb, [[1, KT], [0, ns]]), op=nl.multiply)
    for t0 in range(0, T, PSUM_BANK_FMAX):
        tt = min(PSUM_BANK_FMAX, T - t0)
        acc = nl.ndarray((ns, tt), dtype=nl.float32, buffer=nl.psum)
        for kt in range(KT):
            nisa.nc_matmul(dst=acc, stationary=w_dq[:, kt, :], moving=xs[:, kt, t0 : t0 + tt], accumulate=kt > 0)
        out = nl.ndarray((ns, tt), dtype=dt, buffer=nl.sbuf)
        nisa.tensor_copy(dst=out, src=acc)
        nisa.dma_copy(dst=y.ap([[1, ns], [N, tt]], offset=t0 * N + nb * BLOCK), src=out)


def max_tokens(k: int, itemsize: int) -> int:
    """The most tokens one call takes at contraction ``k`` (x's share of SBUF, ``X_SBUF_BYTES``)."""
    return max(1, X_SBUF_BYTES // (-(-k // BLOCK) * itemsize))


# ----- host-side layout and reference ------------------------------------------------------------------------------
def linear_fp8_kernel_layout(weight: torch.Tensor, scale_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's ``weight [N, K]`` ``float8_e4m3fn`` and ``scale_inv [ceil(N/128), ceil(K/128)]`` -> the kernel
    layout (module docstring): ``(weight [N, K] uint8, scale [NB, KT] fp32)``; new tensors."""
    where = "linear_fp8_kernel_layout"
    require(len(weight.shape) == 2, where, f"weight.shape={tuple(weight.shape)}; must be [N, K]")
    N, K = weight.shape
    KP, KT = _tiles(K, where)
    NB = -(-N // BLOCK)
    require(tuple(scale_inv.shape) == (NB, KT), where, f"scale_inv {tuple(scale_inv.shape)}; must be {(NB, KT)}")
    q, scale = to_trn2_fp8(weight, scale_inv)
    blocks = []
    for nb in range(NB):
        rows = q[nb * BLOCK : (nb + 1) * BLOCK]  # [NS, K] -> [KP, KT, NS]
        blocks.append(rows.reshape(-1, KT, KP).permute(2, 1, 0).reshape(-1))
    return torch.cat(blocks).reshape(N, K), scale.contiguous()


def linear_fp8_model_layout(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``linear_fp8_kernel_layout`` up to the format: ``(values [N, K] fp32, scale [NB, KT])`` with trn2's
    halved values and the doubled scales, so value x scale is the model's weight."""
    N, K = weight.shape
    KP, KT = _tiles(K, "linear_fp8_model_layout")
    flat = trn2_fp8_values(weight.reshape(-1))
    rows = []
    for nb in range(-(-N // BLOCK)):
        ns = min(BLOCK, N - nb * BLOCK)
        block = flat[nb * BLOCK * K : nb * BLOCK * K + ns * K].reshape(KP, KT, ns)
        rows.append(block.permute(2, 1, 0).reshape(ns, K))
    return torch.cat(rows), scale


def linear_fp8_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``linear_fp8`` in fp32 torch from the kernel layout: the weight dequantized exactly, rounded once at the end."""
    values, scale = linear_fp8_model_layout(weight, scale)
    full = scale.repeat_interleave(BLOCK, 0)[: values.shape[0]].repeat_interleave(BLOCK, 1)[:, : values.shape[1]]
    return (x.float() @ (values * full).T).to(x.dtype)
