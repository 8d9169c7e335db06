"""A decode step's decoder layers in one kernel: for each layer the attention half, the all-reduce of its output over
the tensor-parallel ranks, the MoE half and its all-reduce, with the hidden state and the residual staying in SBUF
from one half to the next (the megakernel design of nki-library's ``transformer_tkg``, experimental/transformer,
with this project's two halves and FP8 weights).

What this saves against one kernel per half: the kernel boundaries, each kernel's first-DMA latency, and the
HBM round trips of the hidden state and residual; and the next half's weight DMAs may start while this half still
computes or its all-reduce is in flight (they depend on nothing computed).

The all-reduce: each LNC program all-reduces its own fp32 partial sums (``nki.collectives.all_reduce`` on SBUF, as
nki-library's ``transformer_tkg`` all-reduces SBUF tiles), then the programs add theirs by ``sendrecv`` and round once
to the activation dtype. That is one exchange between the cores fewer than adding over the programs first, and one
rounding where the one-kernel-per-half model rounds each rank's output before summing (so over several ranks the
result is close to, not equal to, that model's).
"""

import nki
import nki.collectives as ncc
import nki.isa as nisa
import nki.language as nl
import torch

from .attention_block import attention_block_fp8_ref, attention_partial, check_attention_fp8
from .grid import sum_over_programs
from .limits import PMAX, require
from .moe_common import load_tile_major, store_tile_major
from .moe_fp8 import check_moe_block_fp8, moe_block_decode_fp8_ref, moe_block_fp8_partial

# The per-layer weight lists, in the kernel's argument order.
LAYER_LISTS = (
    "input_norms",
    "qkv_weights",
    "qkv_scales",
    "q_norms",
    "k_norms",
    "o_weights",
    "o_scales",
    "post_norms",
    "gate_weights_t",
    "w13s",
    "s13s",
    "w2s",
    "s2s",
    "k_caches",
    "v_caches",
)


@nki.jit
def decoder_layers_decode_fp8(
    hidden,
    residual,
    input_norms,
    qkv_weights,
    qkv_scales,
    q_norms,
    k_norms,
    o_weights,
    o_scales,
    post_norms,
    gate_weights_t,
    w13s,
    s13s,
    w2s,
    s2s,
    k_caches,
    v_caches,
    positions,
    cos_sin_cache,
    slot_mapping,
    block_tables,
    context_lens,
    eps,
    scale,
    top_k,
    norm_topk_prob,
    tp_ranks,
):
    """L decoder layers (FP8 attention and MoE halves) of a decode step, with their all-reduces, in one call.

    Per layer l: (a, r) = attention half (``attention_block_decode_fp8``: residual add, RMSNorm, FP8 q/k/v, q/k norm,
    RoPE, K/V to layer l's cache, attention, FP8 o); a = all-reduce(a); (m, r) = MoE half
    (``moe_block_decode_fp8``: residual add, RMSNorm, router, FP8 experts) of (a, r); hidden = all-reduce(m).

    Dimensions: T tokens (one per sequence), H = KT * 128 hidden, L layers; per rank Hq / Hk heads of D = 128,
    E experts, I = IT * IP expert intermediate.

    Args:    hidden, residual [T, H] bf16|fp32 HBM (the first layer's input; a zero residual for the model's first
             layer, whose residual add is x + 0);
             per layer, tuples of L tensors (NKI 0.3 on takes no list arguments) in the fused kernels' layouts:
             input_norms [H]; qkv_weights, qkv_scales, q_norms, k_norms, o_weights, o_scales as
             ``attention_block_decode_fp8``; post_norms [H];
             gate_weights_t [H, E]; w13s, s13s, w2s, s2s as ``moe_block_decode_fp8``; k_caches, v_caches
             [NB, Hk, BS, D] (updated in place and returned);
             positions, cos_sin_cache, slot_mapping, block_tables, context_lens: the step's, as
             ``attention_block_decode_fp8``; eps float; scale float (softmax); top_k int; norm_topk_prob bool;
             tp_ranks int: the tensor-parallel ranks whose partial sums are all-reduced (replica group
             [[0 .. tp_ranks - 1]]; 1: no collective).
    Returns: (out [T, H] the last layer's MoE output, all-reduced; r [T, H] its residual; k_caches; v_caches);
             out and r in hidden's dtype, nl.shared_hbm.
    Tiling:  hidden and residual to SBUF once ([128, T, KT], h = kt * 128 + p); per half the body of its fused
             kernel from SBUF (``attention_partial``, ``moe_block_fp8_partial``; their DMA order), its fp32 partial
             sums all-reduced, added over the programs, rounded (``reduced_over_ranks``); out and r stored at the
             end, each program its share of the hidden tiles.
    Grid:    ``decoder_layers_decode_fp8[g]`` (LNC=2): each half's grid (query heads, expert slots split); each
             program all-reduces its partial sums with the same program of the other ranks.
    Limits:  each half's (``attention_block_decode_fp8``, ``moe_block_decode_fp8``); L >= 1; every tuple of length L.
    """
    where = "decoder_layers_decode_fp8"
    lists = (
        input_norms,
        qkv_weights,
        qkv_scales,
        q_norms,
        k_norms,
        o_weights,
        o_scales,
        post_norms,
        gate_weights_t,
        w13s,
        s13s,
        w2s,
        s2s,
        k_caches,
        v_caches,
    )
    L = len(input_norms) if isinstance(input_norms, (list, tuple)) else 0
    require(L >= 1, where, f"input_norms={type(input_norms).__name__}; must be a tuple of one tensor per layer")
    for name, values in zip(LAYER_LISTS, lists):
        n = len(values) if isinstance(values, (list, tuple)) else -1
        require(n == L, where, f"{name} has {n} entries; must be a tuple of {L} (one per layer, as input_norms)")
    require(int(tp_ranks) >= 1, where, f"tp_ranks={tp_ranks}; must be >= 1")
    hq, K = 0, 0
    for i in range(L):
        hq = check_attention_fp8(
            f"{where} layer {i}",
            hidden,
            residual,
            input_norms[i],
            qkv_weights[i],
            qkv_scales[i],
            q_norms[i],
            k_norms[i],
            positions,
            cos_sin_cache,
            o_weights[i],
            o_scales[i],
            k_caches[i],
            v_caches[i],
            slot_mapping,
            block_tables,
            context_lens,
        )
        _, _, _, K = check_moe_block_fp8(
            f"{where} layer {i}",
            hidden,
            residual,
            post_norms[i],
            gate_weights_t[i],
            w13s[i],
            s13s[i],
            w2s[i],
            s2s[i],
            top_k,
        )
    T, H = hidden.shape
    KT = H // PMAX
    dt = hidden.dtype
    group = ncc.ReplicaGroup([list(range(int(tp_ranks)))]) if int(tp_ranks) > 1 else None
    out = nl.ndarray((T, H), dtype=dt, buffer=nl.shared_hbm)
    r_out = nl.ndarray((T, H), dtype=dt, buffer=nl.shared_hbm)

    x_sb, res_sb = load_tile_major(hidden, T, KT), load_tile_major(residual, T, KT)
    for i in range(L):
        acc, r_sb = attention_partial(
            x_sb,
            res_sb,
            input_norms[i],
            qkv_weights[i],
            qkv_scales[i],
            q_norms[i],
            k_norms[i],
            positions,
            cos_sin_cache,
            o_weights[i],
            o_scales[i],
            k_caches[i],
            v_caches[i],
            slot_mapping,
            block_tables,
            context_lens,
            eps,
            scale,
            hq,
        )
        x_sb = reduced_over_ranks(acc, group, dt)
        acc, res_sb = moe_block_fp8_partial(
            x_sb, r_sb, post_norms[i], gate_weights_t[i], w13s[i], s13s[i], w2s[i], s2s[i], eps, K, norm_topk_prob
        )
        x_sb = reduced_over_ranks(acc, group, dt)
    store_tile_major(out, x_sb, T, KT, False)
    store_tile_major(r_out, res_sb, T, KT, False)
    return out, r_out, k_caches, v_caches


def reduced_over_ranks(acc, group, dt):
    """acc [128, T, KT] fp32 (this program's partial sums) -> [128, T, KT] in ``dt``: all-reduced over ``group``'s
    ranks (None: one rank), each program its own partials in fp32 with the same program of the other ranks, then
    added over the programs (``sendrecv``) and rounded once."""
    T, KT = acc.shape[1], acc.shape[2]
    if group is not None:
        summed = nl.ndarray((PMAX, T, KT), dtype=nl.float32, buffer=nl.sbuf)
        ncc.all_reduce(
            srcs=[acc.reshape((PMAX, T * KT))], dsts=[summed.reshape((PMAX, T * KT))], replica_group=group, op=nl.add
        )
        acc = summed
    sum_over_programs(acc)
    x_sb = nl.ndarray((PMAX, T, KT), dtype=dt, buffer=nl.sbuf)
    nisa.tensor_copy(dst=x_sb, src=acc)
    return x_sb


def decoder_layers_decode_fp8_ref(rank_args: list) -> list:
    """The layers as the model runs them one op per half, in torch, over every rank at once: ``rank_args[r]`` is
    rank r's argument list for ``decoder_layers_decode_fp8`` (``tp_ranks`` = len(rank_args)). Each half is its fused
    kernel's reference per rank; the all-reduce sums the ranks' rounded outputs in fp32, rank order, rounded once.
    Returns per rank (out, r, k_caches, v_caches) with the caches as copies."""
    n = len(rank_args)
    states = [list(a) for a in rank_args]
    hidden, residual = states[0][0], states[0][1]
    dt = hidden.dtype
    L = len(states[0][2])
    caches = [([c.clone() for c in s[15]], [c.clone() for c in s[16]]) for s in states]
    for i in range(L):
        parts = []
        for r, s in enumerate(states):
            layer = [s[2 + j][i] for j in range(len(LAYER_LISTS))]
            positions, cos_sin, slots, tables, ctx, eps, scale = s[17:24]
            a, res, kc, vc = attention_block_fp8_ref(
                hidden,
                residual,
                layer[0],
                layer[1],
                layer[2],
                layer[3],
                layer[4],
                positions,
                cos_sin,
                layer[5],
                layer[6],
                caches[r][0][i],
                caches[r][1][i],
                slots,
                tables,
                ctx,
                eps,
                scale,
            )
            caches[r][0][i], caches[r][1][i] = kc, vc
            parts.append(a)
        hidden, residual = _summed(parts, dt), res
        parts = []
        for s in states:
            top_k, norm = s[24], s[25]
            layer = [s[2 + j][i] for j in range(len(LAYER_LISTS))]
            m, res = moe_block_decode_fp8_ref(
                hidden, residual, layer[7], layer[8], layer[9], layer[10], layer[11], layer[12], s[22], top_k, norm
            )
            parts.append(m)
        hidden, residual = _summed(parts, dt), res
    return [(hidden, residual, caches[r][0], caches[r][1]) for r in range(n)]


def _summed(parts: list, dt) -> torch.Tensor:
    total = parts[0].float().clone()
    for p in parts[1:]:
        total += p.float()
    return total.to(dt)
