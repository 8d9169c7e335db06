"""Routed SwiGLU experts for decode (few tokens): read only the selected experts' weights.

At batch 1 a Qwen3-MoE layer uses 8 of its experts, so the experts' weight bytes decide the time: the kernels here
fetch exactly the selected experts (runtime expert ids become dynamic DMA offsets) and stream them through the
Tensor Engine once. ``moe_block.moe_block_decode`` adds the residual, the RMSNorm and the router in the same
kernel call.

Weight layout and numerics: ``moe_common``.
"""

import nki
import nki.isa as nisa
import nki.language as nl
import torch

from .limits import PMAX, require
from .moe_common import (
    check_experts,
    experts_model_layout,
    experts_ref,
    load_routing,
    load_rows_hp,
    selected_experts,
    store_experts_sum,
)

# Decode handles at most one partition-tile of tokens: the fused block's router puts tokens on partitions.
MAX_DECODE_TOKENS = PMAX


# ----- kernels ----------------------------------------------------------------------------------------------------
@nki.jit
def moe_decode(hidden, w13, w2, topk_weights, topk_ids):
    """Routed experts for a few tokens, reading only the selected experts: out[t] = sum_k w[t,k] * expert(x[t]).

    Dimensions: T tokens (<= 128), H hidden = HP * KT, E experts, K experts per token, I expert intermediate per
    rank = IT * IP (the kernel layout's tiles, module docstring).

    Args:    hidden [T, H] bf16|fp32 HBM; w13 [E, IT, HP, KT, 2*IP] and w2 [E, IT, IP, H] HBM, hidden's dtype, in the
             kernel layout (``experts_kernel_layout``); topk_weights [T, K] fp32 HBM; topk_ids [T, K] int32 HBM.
    Returns: [T, H] hidden's dtype in nl.shared_hbm.
    Tiling:  tokens to SBUF as [HP, T, KT] (one DMA), ids as [1, T*K] and weights broadcast to [HP, T*K] (one DMA
             each); then for each (token, slot) and intermediate chunk: DMA the expert's w13 chunk [HP, KT, 2*IP]
             and w2 chunk [IP, H] at the runtime offset of its id (2 * IT DMAs per slot, >= 4 KiB contiguous per
             partition at Qwen3-30B-A3B sizes), Tensor Engine gate/up and down GEMVs with fp32 PSUM accumulation,
             Scalar silu, Vector silu*up and the weighted fp32 sum in SBUF [HP, T, KT]; one cast and one store.
             Weight bytes read = T * K experts' weights, the minimum when each token's experts are distinct.
    Grid:    ``moe_decode[g]`` (LNC=2: g = 2) splits the T * K slots into g contiguous shares, one per program
             (physical core), so each core reads its share of the selected experts' weights; the programs exchange
             their fp32 partial sums [HP, T, KT] (one ``sendrecv``), both add them in program order and each stores
             its share of the output's partitions.
    Limits:  1 <= T <= 128; hidden, w13 and w2 share a dtype (bf16 or fp32); shapes as the kernel layout;
             topk_weights [T, K] float32 and topk_ids [T, K] int32 with ids in [0, E) (an id out of range fails the
             DMA, oob_mode=error).
    """
    where = "moe_decode"
    T, H, E, HP, KT, IP, IT = check_experts(where, hidden, w13, w2, MAX_DECODE_TOKENS)
    require(
        len(topk_ids.shape) == 2 and topk_ids.shape[0] == T,
        where,
        f"topk_ids.shape={tuple(topk_ids.shape)}; must be [T={T}, K]",
    )
    K = topk_ids.shape[1]
    require(K >= 1, where, f"K={K}; must be >= 1")
    require(topk_ids.dtype == nl.int32, where, f"topk_ids.dtype={topk_ids.dtype}; must be int32")
    require(
        tuple(topk_weights.shape) == (T, K) and topk_weights.dtype == nl.float32,
        where,
        f"topk_weights={tuple(topk_weights.shape)} {topk_weights.dtype}; must be [{T}, {K}] float32",
    )
    out = nl.ndarray((T, H), dtype=hidden.dtype, buffer=nl.shared_hbm)

    x_sb = nl.ndarray((HP, T, KT), dtype=hidden.dtype, buffer=nl.sbuf)
    load_rows_hp(x_sb, hidden, T, H, HP, KT)
    ids_sb, w_sb = load_routing(topk_weights, topk_ids, HP)
    acc = nl.ndarray((HP, T, KT), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=acc, value=0.0)

    selected_experts(acc, x_sb, w13, w2, ids_sb, False, w_sb, T, K)
    store_experts_sum(out, acc, T, H, HP, KT)
    return out


def moe_decode_ref(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """``moe_decode`` in plain fp32 torch; h = silu(gate) * up is rounded to the weights' dtype as in the kernel."""
    w13m, w2m = experts_model_layout(w13, w2)
    return experts_ref(hidden, w13m, w2m, topk_weights, topk_ids)
