"""The decode attention half of a Qwen3 decoder layer in one kernel: residual add and RMSNorm, the q/k/v projection,
per-head q/k RMSNorm and neox RoPE, the new K/V written to the paged cache, attention over each sequence's context,
and the o projection (this rank's partial sum, before the all-reduce). Two entry points, one per weight format:
``attention_block_decode_fp8`` (block-scaled FP8 projections) and ``attention_block_decode`` (projections in the
activation dtype, transposed), one body.

At batch 1 the five kernels this replaces each spend most of their time waiting on their first DMA and on a
dependency chain a few instructions long. Here the DMA queues are fed in the order the data is needed: the small
inputs and the cache's block rows, the q/k/v weights (on the critical path), the first K/V tiles of the cache,
then the o weights; so the weights stream while the norm, q/k/v and attention compute. The new token's K/V are
used from SBUF (its cache slot is masked in the cache read) and written to the cache last, so the cache read does
not wait for the write.

Layout: feature on partitions throughout. The FP8 projections keep ``linear_fp8``'s decode form (FP8 tile
stationary, the token moving, one PSUM column per hidden block times its scale), so each head of q/k/v comes out as
``[D, T]`` (head_dim on partitions, one column per token); with D = 128 one output block is exactly one head.
In that layout:

- q/k RMSNorm sums over partitions with a ones-matrix matmul, one column per (token, head), q and k heads
  together (each column with its own norm weight);
- RoPE's rotate-half is a permutation of the partitions: a ``[D, D]`` 0/1 matrix swapping the halves as stationary
  operand (exact: one non-zero term per output), then x * cos + swapped(x) * sin with cos/sin ``[D, T]`` (the cache
  rows gathered by position, arranged as [cos, cos] and [-sin, sin], transposed by the Tensor Engine);
- a sequence's query heads of one kv head are the ``[D, G]`` columns ``attention_decode`` takes as Q^T;
- the attention output ``[G, D]`` transposed is the o projection's moving operand, its hidden tile = its head.

Numerics follow the model's op sequence (``attention_block_fp8_ref``): rounded to the activation dtype where the
ops round (x + residual, the normalised x, each projection's output, q/k norms, RoPE's products and sums, the
attention output); FP8 blocks as ``linear_fp8``'s decode form (fp32 PSUM column x block scale, summed in fp32).

Grid (LNC=2): the query heads are split between the programs; each computes the kv heads its query heads use
(k and v twice when both programs share one kv head, as at Qwen3-30B-A3B TP 4: 256 KiB more FP8 per program instead
of an exchange between the cores before attention), writes their K/V to the cache (the same bytes when shared),
attends for its query heads and multiplies its heads' columns of the o weight; the partial sums meet by
``sendrecv`` and each program stores half of the hidden tiles.
"""

import nki
import nki.isa as nisa
import nki.language as nl
import torch

from .attention_decode import (
    KV_TILE_SBUF_BYTES,
    MAX_QUERY_GROUP,
    PREFETCH_SBUF_BYTES,
    _PositionTiles,
    attend_pairs,
    attention_decode_ref,
    first_tile_bytes,
    first_tile_rows,
    gather_first_tile,
)
from .attention_prefill import _itemsize, cache_rows, check_cache, scatter_kv_rows
from .grid import program_share
from .limits import PMAX, PSUM_BANK_FMAX, require
from .linear_fp8 import linear_fp8_ref
from .moe_block import normalise
from .moe_common import DTYPES, load_tile_major, store_tile_major
from .moe_fp8 import widened
from .rmsnorm import fused_add_rms_norm_ref
from .rope import _gather_cos_sin, qk_norm_rope_ref
from .views import sbuf_view

HEAD_DIM = PMAX  # one FP8 scale block per head: the kernel's layout needs D = 128 (Qwen3's head_dim)
# Up to this many tokens the model runs these kernels (``ops.attention_block``): beyond, the ops one by one are
# faster, since here each program attends over every sequence (the query heads are split, not the sequences). Cost
# model, Qwen3-30B-A3B TP 4 LNC 2, the kernel vs the five it replaces plus their four boundaries (``kernels check
# --only attention,linear,fused_add,qk_norm_rope --tokens T --lnc 2``): FP8 T = 4 21.4 vs 30.7 us, T = 8 33.6 vs
# 35.5, T = 16 62.2 vs 51.4; bf16 T = 4 24.6 vs 36.5, T = 8 36.2 vs 40.7, T = 16 63.5 vs 55.0.
FUSED_MAX_TOKENS = 8
# Every projection weight a program uses is requested up front and stays in SBUF until used; shapes whose weights
# take more than this per partition are refused (the model runs the ops one by one there), leaving the rest of the
# usable 208 KiB to the activations, the prefetched K/V tiles and the work tiles. By the emulator's capacity check:
# Qwen3-30B-A3B TP 4 on one program fits with 144 KiB of weights (fp32 activations, FP8 widened), TP 1 in bf16
# (288 KiB) does not; TP 4 in bf16 takes 72 KiB.
WEIGHTS_SBUF_BYTES = 152 * 1024


def resident_weight_bytes(q_heads: int, kv_heads: int, hidden: int, activation_bytes: int, fp8: bool) -> int:
    """SBUF bytes per partition of the q/k/v blocks and o tiles one program holding ``q_heads`` query heads and
    ``kv_heads`` kv heads keeps, with activations of ``activation_bytes`` per element: weights are held in the
    activations' dtype (FP8 tiles are widened as they arrive) except FP8 with bf16 activations (1 byte)."""
    weight_bytes = 1 if fp8 and activation_bytes == 2 else activation_bytes
    KT = hidden // PMAX
    return (q_heads + 2 * kv_heads) * KT * HEAD_DIM * weight_bytes + KT * q_heads * PMAX * weight_bytes


@nki.jit
def attention_block_decode_fp8(
    hidden,
    residual,
    gamma,
    qkv_weight,
    qkv_scale,
    q_norm_weight,
    k_norm_weight,
    positions,
    cos_sin_cache,
    o_weight,
    o_scale,
    k_cache,
    v_cache,
    slot_mapping,
    block_tables,
    context_lens,
    eps,
    scale,
):
    """Residual add, RMSNorm, FP8 q/k/v, q/k norm, RoPE, KV-cache write, decode attention and FP8 o for T tokens,
    each the one new token of its sequence.

    Dimensions: T tokens (sequences), H = KT * 128 hidden, Hq / Hk query / kv heads of this rank (G = Hq / Hk),
    D = 128 head_dim, NB cache blocks of BS tokens, MB blocks per sequence.

    Args:    hidden, residual [T, H] bf16|fp32 HBM (the previous layer's output and the residual stream);
             gamma [H] (input_layernorm), q_norm_weight, k_norm_weight [D], hidden's dtype;
             qkv_weight [(Hq + 2 Hk) * D, H] uint8, qkv_scale [Hq + 2 Hk, KT] fp32: the fused q/k/v projection in
             ``linear_fp8``'s kernel layout (block nb = head nb: q heads, then k, then v);
             positions [T] int32; cos_sin_cache [P, D] fp32 (cos | sin halves);
             o_weight [H, Hq * D] uint8, o_scale [KT, Hq] fp32: the o projection in ``linear_fp8``'s layout;
             k_cache, v_cache [NB, Hk, BS, D] hidden's dtype (vLLM's HND layout), updated in place and returned;
             slot_mapping [T], block_tables [T, MB], context_lens [T] int32 (as ``attention_decode``);
             eps float (every RMSNorm of the layer); scale float (softmax scale).
    Returns: (out [T, H] the o projection's partial sum, r [T, H] = hidden + residual, k_cache, v_cache); out and r
             in hidden's dtype, nl.shared_hbm.
    Tiling:  DMAs first, in the order their data is needed: hidden and residual as [128, T, KT] (h = kt * 128 + p),
             gamma, the norm weights as [D, heads] columns, the cos/sin rows by position, the slots' cache rows, the
             context lengths, the first tile's block rows; this program's q/k/v weight blocks [128, KT, D] and scale
             rows; the first K/V tiles of each (sequence, kv head) within PREFETCH_SBUF_BYTES; the o weight columns
             [128, heads, 128] per hidden tile and their scales.
             Vector: r = hidden + residual (stored), x = RMSNorm(r) (``normalise``). Per head block: Tensor: KT FP8
             GEMVs into PSUM [D, T, KT]; Vector: x scales, summed over kt, rounded. q/k norm over [D, T * heads]
             columns and RoPE (``_norm_rope``). Per kv head and sequence: ``attend_cached`` over the L_b - 1 cached
             tokens (the prefetched tile first) and the new token from SBUF; the output [G', D] transposed to
             [D, G'] columns. K/V: Tensor transposes to [T, D] rows, indirect-DMA scatter to the slots. o: per
             PSUM bank of hidden tiles, Tensor GEMVs over this program's heads, Vector scales and sum; partial sums
             over the programs (``store_tile_major``).
    Grid:    ``attention_block_decode_fp8[g]``: query heads split by ``program_share``; module docstring.
    Limits:  1 <= T <= min(128, 512 // max(KT, Hq)); H a multiple of 128; D = 128; G <= 128; BS a power of two
             with the K/V tiles of ``attention_decode``; one float dtype for activations, weights and caches.
    """
    hq = check_attention_fp8(
        "attention_block_decode_fp8",
        hidden,
        residual,
        gamma,
        qkv_weight,
        qkv_scale,
        q_norm_weight,
        k_norm_weight,
        positions,
        cos_sin_cache,
        o_weight,
        o_scale,
        k_cache,
        v_cache,
        slot_mapping,
        block_tables,
        context_lens,
    )
    return _attention_block(
        hidden,
        residual,
        gamma,
        qkv_weight,
        qkv_scale,
        q_norm_weight,
        k_norm_weight,
        positions,
        cos_sin_cache,
        o_weight,
        o_scale,
        k_cache,
        v_cache,
        slot_mapping,
        block_tables,
        context_lens,
        eps,
        scale,
        hq,
    )


@nki.jit
def attention_block_decode(
    hidden,
    residual,
    gamma,
    qkv_weight_t,
    q_norm_weight,
    k_norm_weight,
    positions,
    cos_sin_cache,
    o_weight_t,
    k_cache,
    v_cache,
    slot_mapping,
    block_tables,
    context_lens,
    eps,
    scale,
):
    """``attention_block_decode_fp8`` with the projections' weights in the activation dtype (a bf16 checkpoint's, or
    fp32 test models'): the same step, layouts and grid; the q/k/v and o matmuls accumulate over the hidden tiles
    and heads in PSUM (no block scales).

    Args:    as ``attention_block_decode_fp8`` but qkv_weight_t [H, (Hq + 2 Hk) * D] and o_weight_t [Hq * D, H]:
             the projections' weights transposed (W^T, the layout ``kernels/linear.py`` reads; the model keeps its
             weights column-major so these are views), hidden's dtype.
    Returns: (out, r, k_cache, v_cache) as ``attention_block_decode_fp8``.
    Tiling:  as ``attention_block_decode_fp8``; a q/k/v head block is [128, KT, D] of W^T (256-byte rows), an o tile
             [D, heads, 128]; Tensor accumulates the hidden tiles (q/k/v) and this program's heads (o) in PSUM,
             Vector evicts.
    Limits:  as ``attention_block_decode_fp8``.
    """
    where = "attention_block_decode"
    T, H, dt, hk, d = _check_common(where, hidden, residual, gamma, k_cache, v_cache, slot_mapping)
    require(
        len(qkv_weight_t.shape) == 2 and qkv_weight_t.shape[0] == H and qkv_weight_t.dtype == dt,
        where,
        f"qkv_weight_t {tuple(qkv_weight_t.shape)} {qkv_weight_t.dtype}; must be {dt} [{H}, (Hq + 2 Hk) * {d}]",
    )
    hq = _query_heads(where, "qkv_weight_t columns", qkv_weight_t.shape[1], hk, d)
    _require_tensor(where, "o_weight_t", o_weight_t, (hq * d, H), dt)
    _check_rest(
        where,
        hq,
        hk,
        T,
        H,
        dt,
        q_norm_weight,
        k_norm_weight,
        positions,
        cos_sin_cache,
        k_cache,
        block_tables,
        context_lens,
    )
    return _attention_block(
        hidden,
        residual,
        gamma,
        qkv_weight_t,
        None,
        q_norm_weight,
        k_norm_weight,
        positions,
        cos_sin_cache,
        o_weight_t,
        None,
        k_cache,
        v_cache,
        slot_mapping,
        block_tables,
        context_lens,
        eps,
        scale,
        hq,
    )


def check_attention_fp8(
    where: str,
    hidden,
    residual,
    gamma,
    qkv_weight,
    qkv_scale,
    q_norm_weight,
    k_norm_weight,
    positions,
    cos_sin_cache,
    o_weight,
    o_scale,
    k_cache,
    v_cache,
    slot_mapping,
    block_tables,
    context_lens,
) -> int:
    """``attention_block_decode_fp8``'s argument checks (named errors); returns Hq, this rank's query heads."""
    T, H, dt, hk, d = _check_common(where, hidden, residual, gamma, k_cache, v_cache, slot_mapping)
    require(
        len(qkv_weight.shape) == 2 and qkv_weight.shape[1] == H and qkv_weight.dtype == nl.uint8,
        where,
        f"qkv_weight {tuple(qkv_weight.shape)} {qkv_weight.dtype}; must be uint8 [(Hq + 2 Hk) * {d}, {H}]",
    )
    hq = _query_heads(where, "qkv_weight rows", qkv_weight.shape[0], hk, d)
    KT = H // PMAX
    for name, t, shape, dtype in (
        ("qkv_scale", qkv_scale, (hq + 2 * hk, KT), nl.float32),
        ("o_weight", o_weight, (H, hq * d), nl.uint8),
        ("o_scale", o_scale, (KT, hq), nl.float32),
    ):
        _require_tensor(where, name, t, shape, dtype)
    _check_rest(
        where,
        hq,
        hk,
        T,
        H,
        dt,
        q_norm_weight,
        k_norm_weight,
        positions,
        cos_sin_cache,
        k_cache,
        block_tables,
        context_lens,
    )
    return hq


def _require_tensor(where: str, name: str, t, shape: tuple, dtype) -> None:
    require(
        tuple(t.shape) == shape and t.dtype == dtype,
        where,
        f"{name} {tuple(t.shape)} {t.dtype}; must be {shape} {dtype}",
    )


def _check_common(where: str, hidden, residual, gamma, k_cache, v_cache, slot_mapping):
    """The activations and the caches; returns (T, H, dtype, kv heads, head_dim)."""
    require(len(hidden.shape) == 2, where, f"hidden.shape={tuple(hidden.shape)}; must be [T, H]")
    T, H = hidden.shape
    dt = hidden.dtype
    require(dt in DTYPES, where, f"hidden.dtype={dt}; must be bfloat16 or float32")
    require(H % PMAX == 0, where, f"H={H}; must be a multiple of {PMAX} (whole hidden tiles)")
    _require_tensor(where, "residual", residual, (T, H), dt)
    _require_tensor(where, "gamma", gamma, (H,), dt)
    require(1 <= T <= PMAX, where, f"T={T}; must be 1..{PMAX} (one token per partition where rows are transposed)")
    nb, hk, bs, d = check_cache(where, k_cache, v_cache, slot_mapping, T)
    require(d == HEAD_DIM, where, f"head_dim={d}; must be {HEAD_DIM} (one FP8 scale block per head)")
    require(k_cache.dtype == dt, where, f"k_cache dtype={k_cache.dtype}; must be hidden's {dt}")
    tile_bytes = 2 * bs * d * _itemsize(dt)
    require(
        tile_bytes <= KV_TILE_SBUF_BYTES,
        where,
        f"block_size={bs}: K/V block tiles need {tile_bytes} B per partition; must be <= {KV_TILE_SBUF_BYTES}",
    )
    return T, H, dt, hk, d


def _query_heads(where: str, what: str, rows: int, hk: int, d: int) -> int:
    """Hq from the fused q/k/v size (Hq + 2 Hk) * D."""
    hq = rows // d - 2 * hk
    require(
        hq >= 1 and rows == (hq + 2 * hk) * d and hq % hk == 0,
        where,
        f"{what}={rows}, kv heads={hk}: must be (Hq + 2 * {hk}) * {d} with Hq a multiple of {hk}",
    )
    require(hq // hk <= MAX_QUERY_GROUP, where, f"q heads per kv head={hq // hk}; must be <= {MAX_QUERY_GROUP}")
    return hq


def _check_rest(
    where, hq, hk, T, H, dt, q_norm_weight, k_norm_weight, positions, cos_sin_cache, k_cache, block_tables, context_lens
):
    """The norm weights, positions, RoPE table, block table and context lengths, and the token limit."""
    d = HEAD_DIM
    KT = H // PMAX
    require(
        T <= PSUM_BANK_FMAX // max(KT, hq),
        where,
        f"T={T}; at most {PSUM_BANK_FMAX // max(KT, hq)} tokens (a token's PSUM columns of every hidden tile and "
        "head fit one bank)",
    )
    for name, t, shape, dtype in (
        ("q_norm_weight", q_norm_weight, (d,), dt),
        ("k_norm_weight", k_norm_weight, (d,), dt),
        ("positions", positions, (T,), nl.int32),
        ("context_lens", context_lens, (T,), nl.int32),
    ):
        _require_tensor(where, name, t, shape, dtype)
    require(
        len(block_tables.shape) == 2 and block_tables.shape[0] == T and block_tables.dtype == nl.int32,
        where,
        f"block_tables {tuple(block_tables.shape)} {block_tables.dtype}; must be int32 [{T}, max_blocks]",
    )
    require(
        len(cos_sin_cache.shape) == 2 and cos_sin_cache.shape[1] == d,
        where,
        f"cos_sin_cache.shape={tuple(cos_sin_cache.shape)}; must be [positions, {d}]",
    )


def _attention_block(
    hidden,
    residual,
    gamma,
    qkv_weight,
    qkv_scale,
    q_norm_weight,
    k_norm_weight,
    positions,
    cos_sin_cache,
    o_weight,
    o_scale,
    k_cache,
    v_cache,
    slot_mapping,
    block_tables,
    context_lens,
    eps,
    scale,
    hq: int,
):
    """Both kernels' body (``attention_block_decode_fp8``'s "Tiling"); ``qkv_scale`` / ``o_scale`` None: weights
    in the activation dtype, transposed."""
    T, H = hidden.shape
    dt = hidden.dtype
    KT = H // PMAX
    out = nl.ndarray((T, H), dtype=dt, buffer=nl.shared_hbm)
    r_out = nl.ndarray((T, H), dtype=dt, buffer=nl.shared_hbm)
    x_sb, res_sb = load_tile_major(hidden, T, KT), load_tile_major(residual, T, KT)  # the small inputs first
    acc, _ = attention_partial(
        x_sb,
        res_sb,
        gamma,
        qkv_weight,
        qkv_scale,
        q_norm_weight,
        k_norm_weight,
        positions,
        cos_sin_cache,
        o_weight,
        o_scale,
        k_cache,
        v_cache,
        slot_mapping,
        block_tables,
        context_lens,
        eps,
        scale,
        hq,
        r_out,
    )
    store_tile_major(out, acc, T, KT, True)
    return out, r_out, k_cache, v_cache


def attention_partial(
    x_sb,
    res_sb,
    gamma,
    qkv_weight,
    qkv_scale,
    q_norm_weight,
    k_norm_weight,
    positions,
    cos_sin_cache,
    o_weight,
    o_scale,
    k_cache,
    v_cache,
    slot_mapping,
    block_tables,
    context_lens,
    eps,
    scale,
    hq: int,
    r_out=None,
):
    """The attention half from SBUF: x_sb, res_sb [128, T, KT] (h = kt * 128 + p, activation dtype) are the layer's
    input and residual. Returns (acc [128, T, KT] fp32: the o projection's partial sums over this program's query
    heads, not yet added over the programs; r_sb = x + residual, the next residual, in x_sb's tile). ``r_out`` [T, H]
    (HBM) gets r_sb, each program its share of the hidden tiles, when given."""
    T, KT = x_sb.shape[1], x_sb.shape[2]
    H = KT * PMAX
    dt = x_sb.dtype
    nb, hk, bs, d = k_cache.shape
    group = hq // hk
    # This program's query heads [h0, h1) and the kv heads they read [g0, g1).
    h0, h1 = program_share(hq)
    nq = h1 - h0
    g0, g1 = h0 // group, (h1 - 1) // group + 1
    nk = g1 - g0
    need = resident_weight_bytes(nq, nk, H, _itemsize(dt), fp8=qkv_scale is not None)
    require(
        need <= WEIGHTS_SBUF_BYTES,
        "attention_block_decode" + ("_fp8" if qkv_scale is not None else ""),
        f"{nq} query and {nk} kv heads at H={H}: their weights need {need} B of SBUF per partition; at most "
        f"{WEIGHTS_SBUF_BYTES} (run the ops one by one)",
    )

    # ---- the small inputs first, then this program's q/k/v weight blocks: they stream while the norm computes ----
    r_sb = x_sb
    gamma_sb = nl.ndarray((PMAX, KT), dtype=dt, buffer=nl.sbuf)
    nisa.dma_copy(dst=gamma_sb, src=gamma.ap([[1, PMAX], [PMAX, KT]], offset=0))
    nh = nq + nk  # q heads then k heads: the columns of each token that get q/k norm and RoPE
    gam = nl.ndarray((d, nh), dtype=dt, buffer=nl.sbuf)  # column j: the norm weight of column j of every token
    nisa.dma_copy(dst=gam[:, 0:nq], src=q_norm_weight.ap([[1, d], [0, nq]], offset=0))
    nisa.dma_copy(dst=gam[:, nq:nh], src=k_norm_weight.ap([[1, d], [0, nk]], offset=0))
    cos_t, sin_t = _rope_columns(cos_sin_cache, positions, T, dt)
    rotate = _swap_halves_matrix(d, dt)
    row0 = cache_rows(k_cache, slot_mapping, 0, T)
    per_pair = first_tile_bytes(k_cache, block_tables)
    # sequences whose first K/V tiles are gathered before the o weights are requested (attention_decode's budget)
    prefetch = min(T, PREFETCH_SBUF_BYTES // (per_pair * nk))
    first_rows = [first_tile_rows(k_cache, block_tables, b) for b in range(prefetch)]
    width_max = min(group, nq)
    cached = nl.ndarray((width_max, T), dtype=nl.float32, buffer=nl.sbuf)  # L_b - 1: the tokens before the new one
    nisa.dma_copy(dst=cached, src=context_lens.ap(pattern=[[0, width_max], [1, T]], offset=0))
    nisa.tensor_scalar(dst=cached, data=cached, op0=nl.add, operand0=-1.0)
    blocks = [h for h in range(h0, h1)] + [hq + g for g in range(g0, g1)] + [hq + hk + g for g in range(g0, g1)]
    qkv_w = [_qkv_block(qkv_weight, qkv_scale, blk, T, KT, d, dt) for blk in blocks]

    # the first K/V tiles of the cache next (needed after q/k/v), then the o weights (needed last)
    prefetched = {}  # "b:g" -> the first K/V tile of sequence b, kv head g (string keys: NKI 0.6's dict rule)
    for b in range(prefetch):
        for g in range(g0, g1):
            prefetched[f"{b}:{g}"] = gather_first_tile(k_cache, v_cache, first_rows[b], block_tables, g)
    o_w = [_o_tile(o_weight, kt, h0, nq, hq, d, dt) for kt in range(KT)]  # [128 (d), nq heads, 128 (h)] each
    o_s = None
    if o_scale is not None:  # FP8: scale (hidden tile kt, head h0 + j)
        o_s = nl.ndarray((PMAX, T, KT, nq), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=o_s, src=o_scale.ap([[0, PMAX], [0, T], [hq, KT], [1, nq]], offset=h0))

    # ---- residual add and RMSNorm (hidden split h = kt * 128 + p: the FP8 blocks' split) ----
    nisa.tensor_tensor(dst=r_sb, data1=r_sb, data2=res_sb, op=nl.add)  # rounded as the model's x + residual
    if r_out is not None:
        store_tile_major(r_out, r_sb, T, KT, False)
    x_sb = normalise(r_sb, gamma_sb, eps, H, T)

    # ---- q/k/v: one head per FP8 block, [D, T] each; columns (t, head) so a sequence's heads are contiguous ----
    qk_cols = nl.ndarray((d, T * nh), dtype=dt, buffer=nl.sbuf)  # column t * nh + j: q head h0 + j, then k heads
    v_cols = nl.ndarray((d, T * nk), dtype=dt, buffer=nl.sbuf)  # column t * nk + j: v head g0 + j
    targets = [(qk_cols, j, nh) for j in range(nh)] + [(v_cols, j, nk) for j in range(nk)]
    for (dst, j, heads), (w_mm, s_sb) in zip(targets, qkv_w):
        _project_head(dst, j, heads, x_sb, w_mm, s_sb, T, KT)

    # ---- q/k RMSNorm per (token, head) column, then RoPE, for q and k at once ----
    qk_rot = _norm_rope(qk_cols, gam, eps, cos_t, sin_t, rotate, T, nh)

    # ---- attention per kv head and sequence: the cached context (the new token's slot masked) and the new K/V
    # from SBUF, so the cache gather does not wait for the new K/V's write ----
    o_cols = nl.ndarray((d, T * nq), dtype=dt, buffer=nl.sbuf)  # attention output: column t * nq + j = head h0 + j
    for g in range(g0, g1):
        a0, a1 = max(h0, g * group), min(h1, (g + 1) * group)  # this program's query heads of kv head g
        width = a1 - a0
        items = []  # one per sequence, attended as one pipeline (attend_pairs)
        for b in range(T):
            ctx_len = nl.ndarray((width, 1), dtype=nl.float32, buffer=nl.sbuf)  # operands are whole tiles
            nisa.tensor_copy(dst=ctx_len, src=sbuf_view(cached, [[1, 1]], offset=b, partitions=width))
            c0 = b * nh + a0 - h0
            new_kv = (
                qk_rot[:, b * nh + nq + g - g0 : b * nh + nq + g - g0 + 1],
                v_cols[:, b * nk + g - g0 : b * nk + g - g0 + 1],
            )
            items.append((qk_rot[:, c0 : c0 + width], b, g, ctx_len, new_kv, prefetched.get(f"{b}:{g}")))
        outs = attend_pairs(items, k_cache, v_cache, block_tables, _PositionTiles(width), scale, dt, 0)
        for b in range(T):
            o = outs[b]
            o_t = nl.ndarray((d, width), dtype=dt, buffer=nl.psum)
            nisa.nc_transpose(dst=o_t, data=o)
            c1 = b * nq + a0 - h0
            nisa.tensor_copy(dst=o_cols[:, c1 : c1 + width], src=o_t)

    # ---- the new K/V to their slots (rows [T, D] per kv head); nothing in this kernel reads them back ----
    k_rows = _columns_to_rows(qk_rot, T, nh, nq, nk, dt)
    v_rows = _columns_to_rows(v_cols, T, nk, 0, nk, dt)
    scatter_kv_rows(k_cache, v_cache, k_rows, v_rows, row0, g0)

    # ---- o projection: this program's heads' columns of every hidden tile, summed over the programs ----
    acc = nl.ndarray((PMAX, T, KT), dtype=nl.float32, buffer=nl.sbuf)
    per_bank = max(1, PSUM_BANK_FMAX // (T * nq))  # hidden tiles whose [T, nq] columns share one PSUM bank
    for k0 in range(0, KT, per_bank):
        kn = min(per_bank, KT - k0)
        if o_s is None:  # unscaled: the heads accumulate in PSUM
            sums = nl.ndarray((PMAX, T, kn), dtype=nl.float32, buffer=nl.psum)
            for kk in range(kn):
                for j in range(nq):
                    moving = sbuf_view(o_cols, [[nq, T]], offset=j)
                    nisa.nc_matmul(
                        dst=sums[:, :, kk], stationary=o_w[k0 + kk][:, j, :], moving=moving, accumulate=j > 0
                    )
            nisa.tensor_copy(dst=acc[:, :, k0 : k0 + kn], src=sums)
            continue
        cols = nl.ndarray((PMAX, T, kn, nq), dtype=nl.float32, buffer=nl.psum)
        for kk in range(kn):
            for j in range(nq):
                moving = sbuf_view(o_cols, [[nq, T]], offset=j)
                nisa.nc_matmul(dst=cols[:, :, kk, j], stationary=o_w[k0 + kk][:, j, :], moving=moving)
        scaled = nl.ndarray((PMAX, T, kn, nq), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=scaled, data1=cols, data2=o_s[:, :, k0 : k0 + kn, :], op=nl.multiply)
        nisa.tensor_reduce(dst=acc[:, :, k0 : k0 + kn], op=nl.add, data=scaled, axis=3)
    return acc, r_sb


def _qkv_block(weight, scale, blk: int, T: int, KT: int, d: int, dt):
    """Output block ``blk`` (one head) of the q/k/v weight as the stationary tile [128, KT, D] (hidden h = kt * 128 +
    p on partitions) and its scales [D, T, KT] (every partition and token), one DMA each: FP8 in ``linear_fp8``'s
    layout; or, ``scale`` None, the weight transposed W^T [H, N] in ``dt`` (256-byte rows), no scales."""
    if scale is None:
        N = weight.shape[1]
        w_sb = nl.ndarray((PMAX, KT, d), dtype=weight.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=w_sb, src=weight.ap([[N, PMAX], [PMAX * N, KT], [1, d]], offset=blk * d))
        return w_sb, None
    H = weight.shape[1]
    w_sb = nl.ndarray((PMAX, KT, d), dtype=nl.float8_e4m3, buffer=nl.sbuf)
    nisa.dma_copy(dst=w_sb, src=weight.view(nl.float8_e4m3).ap([[KT * d, PMAX], [d, KT], [1, d]], offset=blk * d * H))
    s_sb = nl.ndarray((d, T, KT), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=s_sb, src=scale.ap([[0, d], [0, T], [1, KT]], offset=blk * KT))
    return widened(w_sb, dt), s_sb


def _o_tile(weight, kt: int, h0: int, nq: int, hq: int, d: int, dt):
    """Hidden tile ``kt`` of the o projection, heads h0 .. h0 + nq - 1: the stationary tiles [D, nq, 128], one DMA:
    FP8 in ``linear_fp8``'s layout ([N = H, K = Hq * D], block kt's bytes [KP, Hq, 128]); or, for a weight in
    ``dt``, its transpose W^T [Hq * D, H] (256-byte rows)."""
    if weight.dtype != nl.uint8:
        H = weight.shape[1]
        w_sb = nl.ndarray((d, nq, PMAX), dtype=weight.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=w_sb, src=weight.ap([[H, d], [d * H, nq], [1, PMAX]], offset=h0 * d * H + kt * PMAX))
        return w_sb
    w_sb = nl.ndarray((d, nq, PMAX), dtype=nl.float8_e4m3, buffer=nl.sbuf)
    src = weight.view(nl.float8_e4m3).ap([[hq * PMAX, d], [PMAX, nq], [1, PMAX]], offset=kt * PMAX * hq * d + h0 * PMAX)
    nisa.dma_copy(dst=w_sb, src=src)
    return widened(w_sb, dt)


def _project_head(dst, j: int, heads: int, x_sb, w_sb, s_sb, T: int, KT: int) -> None:
    """Column j of every token of ``dst [D, T * heads, 1]`` = one FP8 output block of x: Tensor KT GEMVs (FP8
    stationary [128, D], x[:, :, kt] moving [128, T]) into PSUM [D, T, KT]; Vector: times the block scales, summed
    over kt in fp32, rounded to dst's dtype."""
    d = w_sb.shape[2]
    if s_sb is None:  # unscaled: the hidden tiles accumulate in PSUM
        acc_ps = nl.ndarray((d, T), dtype=nl.float32, buffer=nl.psum)
        for kt in range(KT):
            nisa.nc_matmul(dst=acc_ps, stationary=w_sb[:, kt, :], moving=x_sb[:, :, kt], accumulate=kt > 0)
        nisa.tensor_copy(dst=sbuf_view(dst, [[heads, T]], offset=j), src=acc_ps)
        return
    cols = nl.ndarray((d, T, KT), dtype=nl.float32, buffer=nl.psum)
    for kt in range(KT):
        nisa.nc_matmul(dst=cols[:, :, kt], stationary=w_sb[:, kt, :], moving=x_sb[:, :, kt])
    scaled = nl.ndarray((d, T, KT), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=scaled, data1=cols, data2=s_sb, op=nl.multiply)
    acc = nl.ndarray((d, T), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=acc, op=nl.add, data=scaled, axis=2)
    nisa.tensor_copy(dst=sbuf_view(dst, [[heads, T]], offset=j), src=acc)


def _rope_columns(cos_sin_cache, positions, T: int, dt):
    """(cos [D, T], sin [D, T]) in ``dt``: column t is [cos, cos] and [-sin, sin] of positions[t]'s cache row, so
    that RoPE is x * cos + swapped(x) * sin with swapped(x) = [x2, x1] (``_swap_halves_matrix``).
    The rows are gathered by position (T on partitions), arranged by Vector, transposed by the Tensor Engine."""
    d = cos_sin_cache.shape[1]
    half = d // 2
    cs = _gather_cos_sin(cos_sin_cache, positions, 0, T, dt)  # [T, D]: cos | sin, rounded to dt
    both = nl.ndarray((T, 2, d), dtype=dt, buffer=nl.sbuf)  # [cos, cos] then [-sin, sin]
    nisa.tensor_copy(dst=sbuf_view(both, [[half, 2], [1, half]]), src=sbuf_view(cs, [[0, 2], [1, half]]))
    sin_half = sbuf_view(cs, [[1, half]], offset=half)
    nisa.tensor_scalar(dst=sbuf_view(both, [[1, half]], offset=d), data=sin_half, op0=nl.multiply, operand0=-1.0)
    nisa.tensor_copy(dst=sbuf_view(both, [[1, half]], offset=d + half), src=sin_half)
    columns = []
    for i in range(2):
        t_ps = nl.ndarray((d, T), dtype=dt, buffer=nl.psum)
        nisa.nc_transpose(dst=t_ps, data=sbuf_view(both, [[1, d]], offset=i * d))
        t_sb = nl.ndarray((d, T), dtype=dt, buffer=nl.sbuf)
        nisa.tensor_copy(dst=t_sb, src=t_ps)
        columns.append(t_sb)
    return columns[0], columns[1]


def _swap_halves_matrix(d: int, dt):
    """[D, D] stationary R with (R^T x)[m] = x[m + D/2] for m < D/2 and x[m - D/2] above: the halves swapped (the
    sign sits in the sin column). GpSimd iota of m - k, Vector compares."""
    diff = nl.ndarray((d, d), dtype=nl.float32, buffer=nl.sbuf)
    nisa.iota(dst=diff, pattern=[[1, d]], offset=0, channel_multiplier=-1)  # m - k (partition k, column m)
    r = nl.ndarray((d, d), dtype=dt, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=diff, data1=diff, data2=diff, op=nl.multiply)  # (m - k)^2: exact in fp32
    nisa.tensor_scalar(dst=r, data=diff, op0=nl.equal, operand0=float((d // 2) ** 2))
    return r


def _norm_rope(cols, gam, eps, cos_t, sin_t, rotate, T: int, heads: int):
    """RoPE(RMSNorm(x)) for ``cols [D, T * heads]`` (column t * heads + j: head j of token t), ``gam [D, heads]``
    the norm weight of each head column. Vector: x^2; Tensor: its sum over the partitions, on every partition (ones
    matmul); Vector/Scalar: rstd = rsqrt(sum / D + eps), x * rstd rounded (Hugging Face's cast point), times the
    weight; Tensor: the halves swapped (``rotate``); Vector: x * cos + swapped * sin, each product and the sum
    rounded to the tile dtype, as torch rounds them."""
    d, dt = cols.shape[0], cols.dtype
    n = T * heads
    sq = nl.ndarray((d, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=sq, data1=cols, data2=cols, op=nl.multiply)
    ones = nl.ndarray((d, d), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    ss = nl.ndarray((d, n), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=ss, stationary=ones, moving=sq)
    rstd = nl.ndarray((d, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=rstd, data=ss, op0=nl.multiply, operand0=1.0 / d, op1=nl.add, operand1=float(eps))
    nisa.activation(dst=rstd, op=nl.rsqrt, data=rstd)
    normed = nl.ndarray((d, n), dtype=dt, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=normed, data1=cols, data2=rstd, op=nl.multiply)
    weighted = nl.ndarray((d, n), dtype=dt, buffer=nl.sbuf)
    by_token = [[heads, T], [1, heads]]
    nisa.tensor_tensor(
        dst=sbuf_view(weighted, by_token),
        data1=sbuf_view(normed, by_token),
        data2=sbuf_view(gam, [[0, T], [1, heads]]),
        op=nl.multiply,
    )
    swapped = nl.ndarray((d, n), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=swapped, stationary=rotate, moving=weighted)
    a = nl.ndarray((d, n), dtype=dt, buffer=nl.sbuf)
    per_token = [[1, T], [0, heads]]  # cos/sin [D, T] seen per (token, head) column
    nisa.tensor_tensor(
        dst=sbuf_view(a, by_token),
        data1=sbuf_view(weighted, by_token),
        data2=sbuf_view(cos_t, per_token),
        op=nl.multiply,
    )
    b = nl.ndarray((d, n), dtype=dt, buffer=nl.sbuf)
    nisa.tensor_tensor(
        dst=sbuf_view(b, by_token),
        data1=swapped.ap([[n, d], [heads, T], [1, heads]], offset=0),
        data2=sbuf_view(sin_t, per_token),
        op=nl.multiply,
    )
    out = nl.ndarray((d, n), dtype=dt, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=out, data1=a, data2=b, op=nl.add)
    return out


def _columns_to_rows(cols, T: int, stride: int, first: int, heads: int, dt):
    """[T, heads * D] rows (token on partitions) of the head columns ``first .. first + heads - 1`` of every token in
    ``cols [D, T * stride]`` (column t * stride + j): one Tensor transpose per head."""
    d = cols.shape[0]
    rows = nl.ndarray((T, heads * d), dtype=dt, buffer=nl.sbuf)
    for j in range(heads):
        t_ps = nl.ndarray((T, d), dtype=dt, buffer=nl.psum)
        nisa.nc_transpose(dst=t_ps, data=sbuf_view(cols, [[stride, T]], offset=first + j))
        nisa.tensor_copy(dst=rows[:, j * d : (j + 1) * d], src=t_ps)
    return rows


# ----- references ---------------------------------------------------------------------------------------------------
def attention_block_fp8_ref(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    gamma: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_scale: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    o_weight: torch.Tensor,
    o_scale: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    eps: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same step as the model's ops in sequence, in torch from the kernel layouts: fused add + RMSNorm, q/k/v
    (``linear_fp8_ref``: exact dequantization, rounded once), q/k norm + RoPE, decode attention (writing the new
    K/V into copies of the caches), o. Returns (out, r, k_cache, v_cache)."""
    return _block_ref(
        lambda x: linear_fp8_ref(x, qkv_weight, qkv_scale),
        lambda x: linear_fp8_ref(x, o_weight, o_scale),
        hidden,
        residual,
        gamma,
        q_norm_weight,
        k_norm_weight,
        positions,
        cos_sin_cache,
        k_cache,
        v_cache,
        slot_mapping,
        block_tables,
        context_lens,
        eps,
        scale,
    )


def attention_block_ref(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    gamma: torch.Tensor,
    qkv_weight_t: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    o_weight_t: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    eps: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``attention_block_fp8_ref`` with unquantized projections: x @ W^T accumulated in fp32, rounded once (as
    ``F.linear`` and ``kernels/linear.py``)."""
    return _block_ref(
        lambda x: (x.float() @ qkv_weight_t.float()).to(x.dtype),
        lambda x: (x.float() @ o_weight_t.float()).to(x.dtype),
        hidden,
        residual,
        gamma,
        q_norm_weight,
        k_norm_weight,
        positions,
        cos_sin_cache,
        k_cache,
        v_cache,
        slot_mapping,
        block_tables,
        context_lens,
        eps,
        scale,
    )


def _block_ref(
    project_qkv,
    project_o,
    hidden,
    residual,
    gamma,
    q_norm_weight,
    k_norm_weight,
    positions,
    cos_sin_cache,
    k_cache,
    v_cache,
    slot_mapping,
    block_tables,
    context_lens,
    eps,
    scale,
):
    x, r = fused_add_rms_norm_ref(hidden, residual, gamma, eps)
    kv = k_cache.shape[1] * k_cache.shape[-1]
    qkv = project_qkv(x)
    q, k, v = qkv.split([qkv.shape[1] - 2 * kv, kv, kv], dim=-1)
    q, k = qk_norm_rope_ref(q, k, q_norm_weight, k_norm_weight, eps, positions.long(), cos_sin_cache)
    attn, k_cache, v_cache = attention_decode_ref(
        q, k, v, k_cache.clone(), v_cache.clone(), slot_mapping, block_tables, context_lens, scale
    )
    return project_o(attn), r, k_cache, v_cache
