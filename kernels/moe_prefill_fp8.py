"""Routed SwiGLU experts with block-scaled FP8 weights for many tokens: ``moe_prefill``'s expert blocks (tokens
grouped by expert, each used expert's weights read once) on ``moe_decode_fp8``'s FP8 weights and scales.

``moe_decode_fp8`` reads one expert per (token, slot): at 32 decode tokens x 8 slots it reads 256 experts where about
111 distinct ones are used. Here the block table of ``moe_prefill.prefill_block_metadata`` groups the slots by
expert, so each used expert's FP8 bytes cross HBM once per block.

Weights: ``moe_fp8``'s kernel layout (``fp8_experts_kernel_layout``; hidden split ``h = kt * 128 + p``, contraction
tile kt = scale block kt). The scales cannot be folded into a PSUM accumulation over hidden blocks (each block has its
own), so gate/up keep one PSUM slice per hidden block, ``[IP, 2, kt, B]``, scaled per (row, block) and summed over the
blocks on the Vector Engine; the down scales (per intermediate row and output block) multiply h before the down
matmuls, one ``h x s2[:, kt]`` stationary tile per output block.

Numerics as ``moe_decode_fp8``: gate/up per hidden block in fp32, times its scale, summed in fp32; ``silu(gate) *
up`` rounded to the activation dtype; times the down scale, rounded again; down in fp32 PSUM; times the routing
weight, rounded to the output dtype, and the K contributions of a token added by the DMA engine as ``moe_prefill``
does (rounded after each add).
"""

import nki
import nki.isa as nisa
import nki.language as nl
import torch

from .limits import GEMM_MOVING_FMAX, PSUM_BANK_BYTES
from .moe_common import slots_ref
from .moe_fp8 import _check_fp8_experts, dequantized_experts, widened
from .moe_prefill import MAX_PREFILL_TOKENS, _begin, _end, block_row, gather_transposed, used_slots
from .views import sbuf_view

FP32_BYTES = 4


@nki.jit
def moe_prefill_fp8(hidden, w13, s13, w2, s2, block_expert, block_tokens, block_weights, num_blocks):
    """Routed experts with FP8 weights over blocks of tokens grouped by expert: out[t] = sum over t's slots of
    w * expert(x[t]).

    Dimensions: T tokens, H = KT * 128 hidden, E experts, I = IT * IP expert intermediate per rank, NB block-table
    rows, B block size, SB = min(B, 128) tokens per sub-block.

    Args:    hidden [T, H] bf16|fp32 HBM; w13, s13, w2, s2 HBM in ``moe_fp8``'s kernel layout
             (``fp8_experts_kernel_layout``: w13 [E, IT, 128, KT, 2*IP] and w2 [E, IT, IP, H] uint8 (trn2
             ``float8_e4m3`` bytes), s13 [E, IT, IP, 2, KT] and s2 [E, IT, IP, KT] fp32); block_expert [NB] int32,
             block_tokens [NB, B] int32, block_weights [NB, B] fp32, num_blocks [1] int32 HBM
             (``moe_prefill.prefill_block_metadata``).
    Returns: [T, H] hidden's dtype in nl.shared_hbm.
    Tiling:  as ``moe_prefill``: out zeroed, a runtime loop over the used blocks. Per block: its row of the table;
             the token rows gathered and transposed to xT [128, KT, B] (h = kt * 128 + p); per chunk c, DMAs of the
             expert's FP8 w13 chunk [128, KT, 2*IP] and s13 chunk [IP, 2, KT]; Tensor: gate and up per hidden block
             (FP8 stationary [128, IP], moving xT[:, kt, :]) into PSUM [IP, 2, kn, B] (kn blocks per PSUM bank);
             Vector: times the scales (broadcast over the tokens), summed over the blocks into fp32; Scalar silu,
             Vector silu * up into h [IP, IT, B]. Then the expert's FP8 w2 [IP, IT, H] and s2 [IP, IT, KT]; per
             sub-block, Vector hs = h x s2 [IP, IT, KT, SB]; Tensor: per output block kt, IT accumulating matmuls
             (stationary hs[:, c, kt, :] [IP, SB], moving w2[:, c, kt-th 128 columns]) into PSUM [SB, <= 512];
             Vector eviction times the routing weight; one DMA read-modify-write scatter-add into out.
    Grid:    ``moe_prefill_fp8[g]`` as ``moe_prefill``: blocks interleaved over the programs, each into its own
             partial output, summed by rows after a ``core_barrier``.
    Limits:  ``moe_prefill``'s block table limits; H % 128 == 0; IP <= 128; hidden bf16 or fp32.
    """
    _check_fp8_experts("moe_prefill_fp8", hidden, w13, s13, w2, s2, MAX_PREFILL_TOKENS)
    out, partials, nb_reg, SB, NSUB = _begin(
        "moe_prefill_fp8", hidden, block_expert, block_tokens, block_weights, num_blocks
    )
    programs, pid = nl.num_programs(), nl.program_id(0)

    def block(i):
        table = (block_expert, block_tokens, block_weights)
        _fp8_expert_block(partials[pid], hidden, w13, s13, w2, s2, table, i, SB, NSUB)

    nl.fori_loop(pid, nb_reg, block, step=programs)  # blocks interleaved over the programs
    _end(out, partials)
    return out


def _fp8_expert_block(out, hidden, w13, s13, w2, s2, table, i, SB: int, NSUB: int) -> None:
    """Block ``i`` (a loop register): gather, scaled gate/up, silu * up, scaled down, weight, scatter-add."""
    _, IT, P, KT, IP2 = w13.shape
    IP = IP2 // 2
    H = KT * P
    B = SB * NSUB
    dt = hidden.dtype
    w13f, w2f = w13.view(nl.float8_e4m3), w2.view(nl.float8_e4m3)

    eid, tok, wts = block_row(*table, i, SB, NSUB)
    xT = gather_transposed(hidden, tok, P, KT, SB, NSUB, blocked=True)

    # gate/up per intermediate chunk: each hidden block's PSUM slice times its scale, summed over the blocks
    h_sb = nl.ndarray((IP, IT, B), dtype=dt, buffer=nl.sbuf)
    kn = max(1, min(KT, PSUM_BANK_BYTES // (2 * B * FP32_BYTES)))  # hidden blocks whose gate/up slices share a bank
    for c in range(IT):
        w13_sb = nl.ndarray((P, KT, IP2), dtype=nl.float8_e4m3, buffer=nl.sbuf)
        nisa.dma_copy(
            dst=w13_sb,
            src=w13f.ap([[KT * IP2, P], [IP2, KT], [1, IP2]], offset=c * P * KT * IP2, scalar_offset=eid),
        )
        s13_sb = nl.ndarray((IP, 2, KT), dtype=nl.float32, buffer=nl.sbuf)
        src = s13.ap([[2 * KT, IP], [KT, 2], [1, KT]], offset=c * IP * 2 * KT, scalar_offset=eid)
        nisa.dma_copy(dst=s13_sb, src=src)
        w13_mm = widened(w13_sb, dt)
        gu = nl.ndarray((IP, 2, B), dtype=nl.float32, buffer=nl.sbuf)
        for k0 in range(0, KT, kn):
            n = min(kn, KT - k0)
            ps = nl.ndarray((IP, 2, n, B), dtype=nl.float32, buffer=nl.psum)
            for g in range(2):
                for j in range(n):
                    nisa.nc_matmul(
                        dst=ps[:, g, j, :], stationary=w13_mm[:, k0 + j, g * IP : (g + 1) * IP], moving=xT[:, k0 + j, :]
                    )
            # scaled[q, g, b, j] = ps[q, g, j, b] x s13[q, g, k0 + j]: the blocks last, for the reduce
            scaled = nl.ndarray((IP, 2, B, n), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_tensor(
                dst=scaled,
                data1=sbuf_view(ps, [[n * B, 2], [1, B], [B, n]]),
                data2=sbuf_view(s13_sb, [[KT, 2], [0, B], [1, n]], offset=k0),
                op=nl.multiply,
            )
            if k0 == 0:
                nisa.tensor_reduce(dst=gu, op=nl.add, data=scaled, axis=3)
                continue
            part = nl.ndarray((IP, 2, B), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_reduce(dst=part, op=nl.add, data=scaled, axis=3)
            nisa.tensor_tensor(dst=gu, data1=gu, data2=part, op=nl.add)
        gate = nl.ndarray((IP, B), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=gate, op=nl.silu, data=gu[:, 0, :])
        nisa.tensor_tensor(dst=h_sb[:, c, :], data1=gate, data2=gu[:, 1, :], op=nl.multiply)  # rounded to dt

    # down: h x the down scale of each output block as the stationary tile, tokens on the output partitions
    w2_sb = nl.ndarray((IP, IT, H), dtype=nl.float8_e4m3, buffer=nl.sbuf)
    nisa.dma_copy(dst=w2_sb, src=w2f.ap([[H, IP], [IP * H, IT], [1, H]], offset=0, scalar_offset=eid))
    s2_sb = nl.ndarray((IP, IT, KT), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=s2_sb, src=s2.ap([[KT, IP], [IP * KT, IT], [1, KT]], offset=0, scalar_offset=eid))
    w2_mm = widened(w2_sb, dt)
    per_mm = max(1, GEMM_MOVING_FMAX // P)  # output blocks per PSUM tile [SB, <= 512]
    for s in range(NSUB):
        hs = nl.ndarray((IP, IT, KT, SB), dtype=dt, buffer=nl.sbuf)  # rounded as moe_decode_fp8 rounds h x s2
        nisa.tensor_tensor(
            dst=hs,
            data1=sbuf_view(h_sb, [[B, IT], [0, KT], [1, SB]], offset=s * SB),
            data2=sbuf_view(s2_sb, [[KT, IT], [1, KT], [0, SB]]),
            op=nl.multiply,
        )
        y_sb = nl.ndarray((SB, H), dtype=out.dtype, buffer=nl.sbuf)
        for k0 in range(0, KT, per_mm):
            n = min(per_mm, KT - k0)
            y_ps = nl.ndarray((SB, n * P), dtype=nl.float32, buffer=nl.psum)
            for j in range(n):
                kt = k0 + j
                for c in range(IT):
                    nisa.nc_matmul(
                        dst=y_ps[:, j * P : (j + 1) * P],
                        stationary=hs[:, c, kt, :],
                        moving=w2_mm[:, c, kt * P : (kt + 1) * P],
                        accumulate=c > 0,
                    )
            nisa.tensor_scalar(
                dst=y_sb[:, k0 * P : (k0 + n) * P], data=y_ps, op0=nl.multiply, operand0=wts[:, s : s + 1]
            )
        rows = out.ap([[H, SB], [1, H]], offset=0, vector_offset=tok[:, s : s + 1], indirect_dim=0)
        nisa.dma_compute(dst=rows, srcs=[rows, y_sb], reduce_op=nl.add, oob_mode=nisa.oob_mode.skip)


def moe_prefill_fp8_ref(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    block_expert: torch.Tensor,
    block_tokens: torch.Tensor,
    block_weights: torch.Tensor,
    num_blocks: torch.Tensor,
) -> torch.Tensor:
    """``moe_prefill_fp8`` in fp32 torch: each weight dequantized (trn2 FP8 value x its scale), the used blocks'
    valid slots, h rounded to the activation dtype."""
    w13d, w2d = dequantized_experts(w13, s13, w2, s2)
    tokens, experts, weights = used_slots(hidden.shape[0], block_expert, block_tokens, block_weights, num_blocks)
    return slots_ref(hidden, w13d, w2d, tokens, experts, weights, h_dtype=hidden.dtype)
