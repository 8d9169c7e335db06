"""Routed SwiGLU experts for decode reading NxD Inference's own expert weights: the contest drop-in's token-generation
experts, which must take the weights the harness's model holds (no layout of ours, no copy).

NxD's layout per tensor-parallel rank (``ExpertMLPsV2`` ``mlp_op``, filled by NxDI's Qwen3-MoE state-dict conversion,
modeling_qwen3_moe.py ``convert_qwen3_moe_hf_to_neuron_state_dict``): ``gate_up [E, H, 2I]`` with the rank's gate
columns then its up columns (``gate_up[e, h, i] = W_gate[e][i, h]``, ``gate_up[e, h, I + i] = W_up[e][i, h]``), and
``down [E, I, H]`` (``down[e, i, h] = W_down[e][h, i]``). Hidden is split ``h = kt * 128 + p``, so output tile kt of
the down projection is 128 contiguous columns of a ``down`` row; a gate/up chunk reaches partition p as rows
``h = kt * 128 + p`` (runs of IP elements). The intermediate is split into IT chunks of IP rows (``i = c * IP + q``,
``moe_common.split_tiles``).

Numerics: as ``moe_decode`` (``moe_common``): fp32 PSUM, ``silu(gate) * up`` in fp32 rounded once to the weights'
dtype, the routing-weighted sum over the K experts in fp32, rounded once. NxD's selective loading
(``forward_selective_loading``) rounds to bf16 after each matmul and sums in bf16: within the bf16 matmul tolerance.
DMA runs of IP elements (384 B at Qwen3-30B-A3B TP 4 in bf16) are shorter than the 5-D layout's (6 KiB): the cost
model counts bytes and descriptors, not run lengths, so it does not see what that costs on hardware.
"""

import nki
import nki.isa as nisa
import nki.language as nl
import torch

from .grid import program_share
from .limits import PMAX, require
from .moe_common import DTYPES, experts_ref, load_routing, split_tiles, store_tile_major, tile_major

MAX_DECODE_TOKENS = PMAX


@nki.jit
def moe_decode_nxdi(hidden, gate_up, down, topk_weights, topk_ids):
    """Routed experts for a few tokens on NxD's weight layout, reading only the selected experts' weights.

    Dimensions: T tokens (<= 128), H = KT * 128 hidden, E experts, K experts per token, I = IT * IP intermediate per
    rank.

    Args:    hidden [T, H] bf16|fp32 HBM; gate_up [E, H, 2I], down [E, I, H] HBM, hidden's dtype (NxD's layout,
             module docstring); topk_weights [T, K] fp32 HBM (the routing weights, normalised if the model asks);
             topk_ids [T, K] int32 HBM.
    Returns: [T, H] hidden's dtype in nl.shared_hbm (this rank's partial sum; the model all-reduces it).
    Tiling:  tokens to SBUF as [128, T, KT] (h = kt * 128 + p, one DMA); ids [1, T*K]; weights broadcast [128, T*K];
             per (token, slot) and chunk c: one DMA of the expert's gate/up chunk [128, KT, 2, IP] and one of its
             down rows [IP, H], at the runtime offset of its id; Tensor: KT accumulating gate matmuls and KT up
             matmuls (weights stationary [128, IP], the token moving [128, 1]) into PSUM [IP, 1] each; Scalar silu;
             Vector silu * up rounded to the weights' dtype; Tensor: KT down matmuls (down rows stationary
             [IP, 128] of output tile kt, h moving [IP, 1]) accumulating over c into PSUM [128, KT]; Vector: the
             routing-weighted fp32 sum; one cast and one store.
    Grid:    ``moe_decode_nxdi[g]`` splits the T * K slots over the g programs (``sendrecv`` of the fp32 partial sums;
             each program stores its share of the hidden tiles), as ``moe_decode``.
    Limits:  1 <= T <= 128; H % 128 == 0; I splits into ceil(I / 128) equal tiles; hidden, gate_up and down share a
             dtype (bf16 or fp32); ids in [0, E).
    """
    where = "moe_decode_nxdi"
    require(len(hidden.shape) == 2, where, f"hidden.shape={tuple(hidden.shape)}; must be [T, H]")
    T, H = hidden.shape
    require(1 <= T <= MAX_DECODE_TOKENS, where, f"T={T}; must be 1..{MAX_DECODE_TOKENS}")
    require(hidden.dtype in DTYPES, where, f"hidden.dtype={hidden.dtype}; must be bfloat16 or float32")
    require(H % PMAX == 0, where, f"H={H}; must be a multiple of {PMAX} (hidden tiles of 128 partitions)")
    require(
        len(gate_up.shape) == 3 and gate_up.shape[1] == H and gate_up.shape[2] % 2 == 0,
        where,
        f"gate_up.shape={tuple(gate_up.shape)}; must be [E, H={H}, 2I] (NxD's layout)",
    )
    E, _, I2 = gate_up.shape
    inter = I2 // 2
    require(
        tuple(down.shape) == (E, inter, H), where, f"down.shape={tuple(down.shape)}; must be {(E, inter, H)} [E, I, H]"
    )
    require(
        gate_up.dtype == hidden.dtype and down.dtype == hidden.dtype,
        where,
        f"gate_up {gate_up.dtype}, down {down.dtype}; must be hidden's {hidden.dtype}",
    )
    require(len(topk_ids.shape) == 2 and topk_ids.shape[0] == T, where, f"topk_ids {tuple(topk_ids.shape)}; [T, K]")
    K = topk_ids.shape[1]
    require(tuple(topk_weights.shape) == (T, K), where, f"topk_weights {tuple(topk_weights.shape)}; must be [T, K]")
    IP, IT = split_tiles(inter, where, "I")
    KT = H // PMAX
    dt = hidden.dtype
    out = nl.ndarray((T, H), dtype=dt, buffer=nl.shared_hbm)

    x_sb = nl.ndarray((PMAX, T, KT), dtype=dt, buffer=nl.sbuf)
    nisa.dma_copy(dst=x_sb, src=tile_major(hidden, T, KT))
    ids_sb, w_sb = load_routing(topk_weights, topk_ids, PMAX)
    acc = nl.ndarray((PMAX, T, KT), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=acc, value=0.0)

    first, last = program_share(T * K)
    for s in range(first, last):
        t = s // K
        eid = ids_sb[0:1, s : s + 1]
        y_ps = nl.ndarray((PMAX, KT), dtype=nl.float32, buffer=nl.psum)
        for c in range(IT):
            gu_sb = nl.ndarray((PMAX, KT, 2, IP), dtype=dt, buffer=nl.sbuf)  # rows h = kt * 128 + p
            nisa.dma_copy(
                dst=gu_sb,
                src=gate_up.ap([[I2, PMAX], [PMAX * I2, KT], [inter, 2], [1, IP]], offset=c * IP, scalar_offset=eid),
            )
            dn_sb = nl.ndarray((IP, H), dtype=dt, buffer=nl.sbuf)
            nisa.dma_copy(dst=dn_sb, src=down.ap([[H, IP], [1, H]], offset=c * IP * H, scalar_offset=eid))
            g_ps = nl.ndarray((IP, 1), dtype=nl.float32, buffer=nl.psum)
            u_ps = nl.ndarray((IP, 1), dtype=nl.float32, buffer=nl.psum)
            for kt in range(KT):
                nisa.nc_matmul(
                    dst=g_ps, stationary=gu_sb[:, kt, 0, :], moving=x_sb[:, t, kt : kt + 1], accumulate=kt > 0
                )
                nisa.nc_matmul(
                    dst=u_ps, stationary=gu_sb[:, kt, 1, :], moving=x_sb[:, t, kt : kt + 1], accumulate=kt > 0
                )
            gate = nl.ndarray((IP, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.activation(dst=gate, op=nl.silu, data=g_ps)
            h_sb = nl.ndarray((IP, 1), dtype=dt, buffer=nl.sbuf)  # rounded to the weights' dtype
            nisa.tensor_tensor(dst=h_sb, data1=gate, data2=u_ps, op=nl.multiply)
            for kt in range(KT):
                nisa.nc_matmul(
                    dst=y_ps[:, kt : kt + 1],
                    stationary=dn_sb[:, kt * PMAX : (kt + 1) * PMAX],
                    moving=h_sb,
                    accumulate=c > 0,
                )
        nisa.scalar_tensor_tensor(
            dst=acc[:, t, :], data=y_ps, op0=nl.multiply, operand0=w_sb[:, s : s + 1], op1=nl.add, operand1=acc[:, t, :]
        )
    store_tile_major(out, acc, T, KT, True)
    return out


def moe_decode_nxdi_ref(hidden, gate_up, down, topk_weights, topk_ids) -> torch.Tensor:
    """``moe_decode_nxdi`` in fp32 torch (``moe_common.experts_ref`` on the model's [E, 2I, H] / [E, H, I])."""
    return experts_ref(hidden, gate_up.transpose(1, 2), down.transpose(1, 2), topk_weights, topk_ids)
