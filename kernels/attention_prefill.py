"""Causal self-attention for one prefill sequence (flash attention, GQA), writing the new K/V into the paged cache.

``out[t, h] = softmax_j<=t(scale * q[t, h] . k[j, h // G]) @ v[:, h // G]`` for one sequence that starts at position
0 (no prior context), with the softmax computed online in fp32 (running max and sum per query row, as nki-library's
``attention_cte`` and FlashAttention do), so keys are streamed in tiles and the [T, T] score matrix never exists.
Before attending, the kernel scatters the sequence's K/V rows into the paged KV cache ``[num_blocks, kv_heads,
block_size, head_dim]`` (vLLM's HND layout, research/vllm.md) at ``slot_mapping`` (slot = block * block_size +
offset; negative slots are padding and are skipped), so the decode kernel finds them there.

The scatter and the online-softmax step are shared with ``attention_decode`` (same file family, one definition).
"""

import nki
import nki.isa as nisa
import nki.language as nl
import torch

from .attention_ref import attend_prefill, write_kv_cache_
from .limits import GEMM_MOVING_FMAX, PMAX, PSUM_BANK_FMAX, SBUF_PARTITION_BYTES, require

Q_ROWS_PER_TILE = PMAX  # query rows per tile: one per partition of the score tile
KEYS_PER_SCORE_TILE = GEMM_MOVING_FMAX  # keys per QK^T matmul: the moving free size (512), one fp32 PSUM bank
KEYS_PER_PV_TILE = PMAX  # keys per P @ V matmul: the contraction runs on the partition axis
MAX_HEAD_DIM = PMAX  # head_dim is the QK^T contraction, on partitions
# Masked scores: finite (so max/subtract never meet inf - inf) and far below any real score, so that
# exp(scale * (MASK_SCORE - max)) underflows to exactly 0 for any scale >= 1e-20.
MASK_SCORE = -1.0e30
# K^T [D, T] and V [128, T/128 * D] of one kv head stay in SBUF for the whole head: 2 * T * itemsize bytes per
# partition at D = 128. 16,384 tokens in fp32 is 128 KiB of the 207 KiB usable (limits.SBUF_PARTITION_BYTES), the
# rest holds the working tiles (a [128, 512] fp32 score and probability tile, the accumulator); longer prompts need
# KV streaming in sections (nki-library attention_cte does 8K sections), not implemented.
MAX_PREFILL_TOKENS = 16384
# Slot -> cache row arithmetic runs through fp32 on the Vector Engine (tensor_scalar computes in fp32): exact for
# integers below 2^24 (fp32 mantissa), so the cache may hold at most 2^24 rows of [head_dim] per K and V.
MAX_CACHE_ROWS = 1 << 24


def _itemsize(dtype) -> int:
    return getattr(dtype, "itemsize", 4)


def _check_cache_args(where: str, k, v, k_cache, v_cache, slot_mapping, tokens: int) -> tuple[int, int, int, int]:
    """Validate the K/V inputs against the cache; returns (num_blocks, kv_heads, block_size, head_dim)."""
    nb, hk, bs, d = check_cache(where, k_cache, v_cache, slot_mapping, tokens)
    for name, t in (("k", k), ("v", v)):
        require(
            tuple(t.shape) == (tokens, hk * d),
            where,
            f"{name}.shape={tuple(t.shape)}; must be ({tokens}, kv_heads*head_dim={hk * d})",
        )
    require(
        k.dtype == v.dtype == k_cache.dtype,
        where,
        f"dtypes k={k.dtype}, v={v.dtype}, k_cache={k_cache.dtype}, v_cache={v_cache.dtype}; must all be equal",
    )
    return nb, hk, bs, d


def check_cache(where: str, k_cache, v_cache, slot_mapping, tokens: int) -> tuple[int, int, int, int]:
    """Validate the paged caches and the slots of ``tokens`` new tokens; returns (num_blocks, kv_heads, block_size,
    head_dim)."""
    require(len(k_cache.shape) == 4, where, f"k_cache.shape={tuple(k_cache.shape)}; must be [NB, Hk, BS, D]")
    require(
        tuple(v_cache.shape) == tuple(k_cache.shape),
        where,
        f"v_cache.shape={tuple(v_cache.shape)}; must equal k_cache.shape={tuple(k_cache.shape)}",
    )
    nb, hk, bs, d = k_cache.shape
    require(1 <= d <= MAX_HEAD_DIM, where, f"head_dim={d}; must be 1..{MAX_HEAD_DIM} (QK^T contracts on partitions)")
    require(bs >= 1 and bs & (bs - 1) == 0, where, f"block_size={bs}; must be a power of two (slot -> block by shift)")
    require(
        nb * hk * bs <= MAX_CACHE_ROWS,
        where,
        f"cache rows={nb * hk * bs} (num_blocks x kv_heads x block_size); must be <= {MAX_CACHE_ROWS} "
        "(fp32-exact row arithmetic)",
    )
    require(
        k_cache.dtype == v_cache.dtype,
        where,
        f"dtypes k_cache={k_cache.dtype}, v_cache={v_cache.dtype}; must be equal",
    )
    require(
        tuple(slot_mapping.shape) == (tokens,),
        where,
        f"slot_mapping.shape={tuple(slot_mapping.shape)}; must be ({tokens},)",
    )
    require(str(slot_mapping.dtype).endswith("int32"), where, f"slot_mapping dtype={slot_mapping.dtype}; must be int32")
    return nb, hk, bs, d


def _write_kv_cache(k_cache, v_cache, k, v, slot_mapping) -> None:
    """Scatter K/V rows ``[T, Hk*D]`` into the paged caches at ``slot_mapping``; negative slots are skipped.

    Per tile of up to 128 tokens (token on partition): DMA the slots, K and V into SBUF; Vector: block = slot >>
    log2(BS), offset = slot & (BS - 1), row = block * Hk * BS + offset (+ g * BS per kv head) in the cache viewed as
    rows ``[NB * Hk * BS, D]``; one indirect-DMA scatter per kv head and tensor with ``oob_mode=skip``. A negative
    slot gives a negative block under an arithmetic shift, or a block past the cache under a logical one, so its row
    is out of bounds either way and the DMA skips it.
    """
    tokens = k.shape[0]
    for t0 in range(0, tokens, PMAX):
        n = min(PMAX, tokens - t0)
        row0 = cache_rows(k_cache, slot_mapping, t0, n)
        k_sb = nl.ndarray((n, k.shape[1]), dtype=k.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=k_sb, src=k[t0 : t0 + n, :])
        v_sb = nl.ndarray((n, v.shape[1]), dtype=v.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=v_sb, src=v[t0 : t0 + n, :])
        scatter_kv_rows(k_cache, v_cache, k_sb, v_sb, row0, 0)


def cache_rows(k_cache, slot_mapping, t0: int, n: int):
    """[n, 1] int32 SBUF: the row of kv head 0 for slots ``slot_mapping[t0 : t0 + n]`` in a cache ``[NB, Hk, BS, D]``
    viewed as rows ``[NB * Hk * BS, D]`` (Vector: block = slot >> log2(BS), offset = slot & (BS - 1), row = block *
    Hk * BS + offset). A negative slot gives a row out of bounds (``_write_kv_cache``)."""
    nb, hk, bs, d = k_cache.shape
    slot = nl.ndarray((n, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=slot, src=slot_mapping[t0 : t0 + n])
    block = nl.ndarray((n, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=block, data=slot, op0=nl.right_shift, operand0=bs.bit_length() - 1)
    offset = nl.ndarray((n, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=offset, data=slot, op0=nl.bitwise_and, operand0=bs - 1)
    row0 = nl.ndarray((n, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=row0, data=block, op0=nl.multiply, operand0=float(hk * bs))
    nisa.tensor_tensor(dst=row0, data1=row0, data2=offset, op=nl.add)
    return row0


def scatter_kv_rows(k_cache, v_cache, k_sb, v_sb, row0, g0: int) -> None:
    """Write ``k_sb, v_sb [n, heads * D]`` (SBUF, one token per partition, kv heads g0 .. g0 + heads - 1) at the rows
    ``row0`` (``cache_rows``): one indirect-DMA scatter per kv head and tensor, out-of-bounds rows skipped."""
    nb, hk, bs, d = k_cache.shape
    n = k_sb.shape[0]
    k_rows = k_cache.reshape((nb * hk * bs, d))
    v_rows = v_cache.reshape((nb * hk * bs, d))
    for j in range(k_sb.shape[1] // d):
        g = g0 + j
        row = row0
        if g > 0:
            row = nl.ndarray((n, 1), dtype=nl.int32, buffer=nl.sbuf)
            nisa.tensor_scalar(dst=row, data=row0, op0=nl.add, operand0=float(g * bs))
        for rows_view, src in ((k_rows, k_sb), (v_rows, v_sb)):
            nisa.dma_copy(
                dst=rows_view.ap(pattern=[[d, n], [1, d]], vector_offset=row, indirect_dim=0),
                src=src[:, j * d : (j + 1) * d],
                oob_mode=nisa.oob_mode.skip,
            )


class _SoftmaxState(nl.NKIObject):
    """Running max ``m`` (raw scores), sum ``l`` and output accumulator ``acc`` [rows, D] of one query tile, fp32."""

    def __init__(self) -> None:
        self.m = None
        self.l = None
        self.acc = None


def _softmax_probs(state: _SoftmaxState, scores, tile_max, probs, scale: float):
    """Online-softmax step, part 1: fold ``tile_max`` into the running max and write ``probs`` = exp(scale * (s - m)).

    Scalar Engine: -scale * m_new; probs with their row sums (activation add-reduce); alpha = exp(scale * (m_old -
    m_new)), the factor the old sum and accumulator are rescaled by. Vector: the max and the sum update.
    Returns alpha, or None on the first step (nothing to rescale). ``scores`` may be in PSUM or SBUF.
    """
    rows = scores.shape[0]
    first = state.m is None
    m_new = tile_max
    if not first:
        m_new = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        # GpSimd: a [rows, 1] op costs the Vector Engine its fixed overhead, and Vector is the busiest engine here
        nisa.tensor_tensor(dst=m_new, data1=state.m, data2=tile_max, op=nl.maximum, engine=nisa.gpsimd_engine)
    neg_scaled_max = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=neg_scaled_max, op=nl.copy, data=m_new, scale=-scale)
    row_sum = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(
        dst=probs,
        op=nl.exp,
        data=scores,
        bias=neg_scaled_max,
        scale=scale,
        reduce_op=nl.add,
        reduce_res=row_sum,
        reduce_cmd=nisa.reduce_cmd.reset_reduce,
    )
    alpha = None
    if first:
        state.l = row_sum
    else:
        alpha = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=alpha, op=nl.exp, data=state.m, bias=neg_scaled_max, scale=scale)
        nisa.scalar_tensor_tensor(
            dst=state.l, data=state.l, op0=nl.multiply, operand0=alpha, op1=nl.add, operand1=row_sum
        )
    state.m = m_new
    return alpha


def _softmax_accumulate(state: _SoftmaxState, alpha, pv) -> None:
    """Online-softmax step, part 2: ``acc = acc * alpha + pv`` (``pv`` = this tile's P @ V in PSUM)."""
    if state.acc is None:
        state.acc = nl.ndarray(pv.shape, dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=state.acc, src=pv)
        return
    nisa.scalar_tensor_tensor(dst=state.acc, data=state.acc, op0=nl.multiply, operand0=alpha, op1=nl.add, operand1=pv)


def _softmax_finish(state: _SoftmaxState, dtype):
    """``acc / l`` in ``dtype`` (SBUF): Vector reciprocal of the row sums, then a per-row multiply."""
    rows = state.acc.shape[0]
    inv = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=inv, data=state.l)
    out = nl.ndarray(state.acc.shape, dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=out, data=state.acc, op0=nl.multiply, operand0=inv)
    return out


@nki.jit
def attention_prefill(q, k, v, k_cache, v_cache, slot_mapping, scale):
    """Dimensions: T tokens of one sequence (positions 0..T-1), Hq query heads, Hk kv heads (G = Hq / Hk query heads
    share one kv head, GQA), D head_dim, NB cache blocks of BS tokens.

    Args:    q [T, Hq*D] HBM (after q-norm and RoPE); k, v [T, Hk*D] HBM, same dtype as the cache (bf16 or fp32);
             k_cache, v_cache [NB, Hk, BS, D] HBM (vLLM HND layout), updated in place and returned;
             slot_mapping [T] int32 HBM (slot = block * BS + offset; negative = padding, not written);
             scale: float, the softmax scale (1/sqrt(D) for Qwen3).
    Returns: (out [T, Hq*D] in q's dtype, k_cache, v_cache), all nl.shared_hbm.
    Tiling:  first _write_kv_cache (DMA scatter per 128 tokens). Then per kv head g: K^T [D, T] (DMA transpose per 512
             keys) and V [128, T/128, D] (DMA per 128 keys) stay in SBUF; per query head of g, per query tile of 128
             rows (Q^T [D, 128] by DMA transpose), per key tile of 512 up to the diagonal (causal tile skipping): Tensor
             S = Q K^T [128, 512] into PSUM; Vector row max, on diagonal tiles fused with the causal mask (select_reduce
             with a GpSimd affine_select predicate made once per diagonal offset); Scalar exp with row sums (online
             softmax, fp32 statistics); Tensor transposes P in 128-key blocks and accumulates P @ V [128, D] in PSUM;
             Vector rescales and adds into the fp32 accumulator. Finally acc / l, cast to q's dtype, DMA to out.
    Limits:  D <= 128; Hq a multiple of Hk; BS a power of two; NB*Hk*BS <= 2^24; 1 <= T <= MAX_PREFILL_TOKENS
             (16,384); q, k, v, caches of one float dtype (bf16 or fp32); slot_mapping int32; one sequence per call.
    """
    where = "attention_prefill"
    require(len(q.shape) == 2, where, f"q.shape={tuple(q.shape)}; must be 2-D [T, Hq*D]")
    T = q.shape[0]
    require(1 <= T <= MAX_PREFILL_TOKENS, where, f"T={T}; must be 1..{MAX_PREFILL_TOKENS} (K/V of a head in SBUF)")
    nb, hk, bs, d = _check_cache_args(where, k, v, k_cache, v_cache, slot_mapping, T)
    require(q.shape[1] % d == 0, where, f"q.shape[1]={q.shape[1]}; must be a multiple of head_dim={d}")
    hq = q.shape[1] // d
    require(hq % hk == 0, where, f"q heads={hq}, kv heads={hk}; q heads must be a multiple of kv heads (GQA)")
    require(q.dtype == k.dtype, where, f"q dtype={q.dtype}, k dtype={k.dtype}; must be equal (one matmul dtype)")
    kv_bytes = (T + -(-T // PMAX) * d) * _itemsize(k.dtype)
    require(
        kv_bytes <= SBUF_PARTITION_BYTES // 2,
        where,
        f"T={T}, D={d}: K/V of one head need {kv_bytes} B per partition; must be <= {SBUF_PARTITION_BYTES // 2}",
    )
    group = hq // hk

    _write_kv_cache(k_cache, v_cache, k, v, slot_mapping)

    out = nl.ndarray((T, hq * d), dtype=q.dtype, buffer=nl.shared_hbm)
    key_tiles = -(-T // KEYS_PER_PV_TILE)
    predicates: dict = {}
    for g in range(hk):
        k_t = nl.ndarray((d, T), dtype=k.dtype, buffer=nl.sbuf)
        for c0 in range(0, T, KEYS_PER_SCORE_TILE):
            w = min(KEYS_PER_SCORE_TILE, T - c0)
            nisa.dma_transpose(dst=k_t[:, c0 : c0 + w], src=k[c0 : c0 + w, g * d : (g + 1) * d])
        v_sb = nl.ndarray((PMAX, key_tiles * d), dtype=v.dtype, buffer=nl.sbuf)
        for j in range(key_tiles):
            kc = min(PMAX, T - j * PMAX)
            nisa.dma_copy(dst=v_sb[0:kc, j * d : (j + 1) * d], src=v[j * PMAX : j * PMAX + kc, g * d : (g + 1) * d])
        for h in range(g * group, (g + 1) * group):
            for q0 in range(0, T, Q_ROWS_PER_TILE):
                nq = min(Q_ROWS_PER_TILE, T - q0)
                q_t = nl.ndarray((d, nq), dtype=q.dtype, buffer=nl.sbuf)
                nisa.dma_transpose(dst=q_t, src=q[q0 : q0 + nq, h * d : (h + 1) * d])
                o = _attend_query_tile(q_t, k_t, v_sb, q0, scale, q.dtype, predicates)
                nisa.dma_copy(dst=out[q0 : q0 + nq, h * d : (h + 1) * d], src=o)
    return out, k_cache, v_cache


def _causal_predicate(predicates: dict, delta: int):
    """[128, 512] uint8: 1 where key j <= query row i + delta (``delta`` = q0 - k0 of a diagonal tile), else 0.

    GpSimd affine_select over a ones tile, once per distinct delta (0, 128, 256, 384) per kernel call; diagonal
    tiles then mask, copy and take the row max in one Vector select_reduce.
    """
    key = f"delta{delta}"  # string keys: the only dict keys NKI 0.6 kernels may use
    if key not in predicates:
        if "ones" not in predicates:
            predicates["ones"] = nl.ndarray((Q_ROWS_PER_TILE, KEYS_PER_SCORE_TILE), dtype=nl.uint8, buffer=nl.sbuf)
            nisa.memset(dst=predicates["ones"], value=1, engine=nisa.gpsimd_engine)
        pred = nl.ndarray((Q_ROWS_PER_TILE, KEYS_PER_SCORE_TILE), dtype=nl.uint8, buffer=nl.sbuf)
        nisa.affine_select(
            dst=pred,
            pattern=[[-1, KEYS_PER_SCORE_TILE]],
            channel_multiplier=1,
            on_true_tile=predicates["ones"],
            on_false_value=0.0,
            cmp_op=nl.greater_equal,
            offset=delta,
        )
        predicates[key] = pred
    return predicates[key]


def _attend_query_tile(q_t, k_t, v_sb, q0: int, scale: float, out_dtype, predicates: dict):
    """Causal attention of one query tile (Q^T [D, nq], rows q0..q0+nq-1) over keys 0..q0+nq-1; returns [nq, D]."""
    d, nq = q_t.shape
    state = _SoftmaxState()
    for k0 in range(0, q0 + nq, KEYS_PER_SCORE_TILE):
        nk = min(KEYS_PER_SCORE_TILE, q0 + nq - k0)
        s_psum = nl.ndarray((nq, nk), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=s_psum, stationary=q_t, moving=k_t[:, k0 : k0 + nk], accumulate=False)
        tile_max = nl.ndarray((nq, 1), dtype=nl.float32, buffer=nl.sbuf)
        scores = s_psum
        if k0 + nk - 1 > q0:  # some key lies after some query of the tile: mask key j > query i
            scores = nl.ndarray((nq, nk), dtype=nl.float32, buffer=nl.sbuf)
            nisa.select_reduce(
                dst=scores,
                predicate=_causal_predicate(predicates, q0 - k0)[0:nq, 0:nk],
                on_true=s_psum,
                on_false=MASK_SCORE,
                reduce_res=tile_max,
                reduce_cmd=nisa.reduce_cmd.reset_reduce,
                reduce_op=nl.maximum,
            )
        else:
            nisa.tensor_reduce(dst=tile_max, op=nl.maximum, data=scores, axis=1)
        probs = nl.ndarray((nq, nk), dtype=v_sb.dtype, buffer=nl.sbuf)
        alpha = _softmax_probs(state, scores, tile_max, probs, scale)
        pv = _probs_times_values(probs, v_sb, k0, d)
        _softmax_accumulate(state, alpha, pv)
    return _softmax_finish(state, out_dtype)


def _probs_times_values(probs, v_sb, k0: int, d: int):
    """P [nq, nk] @ V[k0:k0+nk] -> PSUM [nq, D]: Tensor transposes of P per 128 keys into one PSUM tile, one copy
    to SBUF (Vector), then one matmul per 128 keys accumulating in PSUM."""
    nq, nk = probs.shape
    blocks = -(-nk // KEYS_PER_PV_TILE)
    require(blocks * nq <= PSUM_BANK_FMAX, "attention_prefill", f"P^T tile {nk}x{nq}; exceeds one PSUM bank")
    p_t_psum = nl.ndarray((KEYS_PER_PV_TILE, blocks * nq), dtype=probs.dtype, buffer=nl.psum)
    p_t = nl.ndarray((KEYS_PER_PV_TILE, blocks * nq), dtype=probs.dtype, buffer=nl.sbuf)
    full = nk // KEYS_PER_PV_TILE
    for c in range(blocks):
        kc = min(KEYS_PER_PV_TILE, nk - c * KEYS_PER_PV_TILE)
        nisa.nc_transpose(
            dst=p_t_psum[0:kc, c * nq : (c + 1) * nq],
            data=probs[:, c * KEYS_PER_PV_TILE : c * KEYS_PER_PV_TILE + kc],
        )
    if full:
        nisa.tensor_copy(dst=p_t[:, 0 : full * nq], src=p_t_psum[:, 0 : full * nq])
    if full < blocks:
        kc = nk - full * KEYS_PER_PV_TILE
        nisa.tensor_copy(dst=p_t[0:kc, full * nq : blocks * nq], src=p_t_psum[0:kc, full * nq : blocks * nq])
    pv = nl.ndarray((nq, d), dtype=nl.float32, buffer=nl.psum)
    for c in range(blocks):
        kc = min(KEYS_PER_PV_TILE, nk - c * KEYS_PER_PV_TILE)
        j = k0 // KEYS_PER_PV_TILE + c
        nisa.nc_matmul(
            dst=pv,
            stationary=p_t[0:kc, c * nq : (c + 1) * nq],
            moving=v_sb[0:kc, j * d : (j + 1) * d],
            accumulate=c > 0,
        )
    return pv


# ----- reference ---------------------------------------------------------------------------------------------------
def write_kv_cache_ref(k_cache, v_cache, k, v, slot_mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """New caches with rows ``k``/``v`` [T, Hk*D] written at ``slot_mapping`` (negative slots skipped)."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    write_kv_cache_(k_cache, v_cache, k, v, slot_mapping)
    return k_cache, v_cache


def attention_prefill_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain fp32 causal GQA attention over the sequence (``attention_ref``), plus the cache write."""
    k_cache, v_cache = write_kv_cache_ref(k_cache, v_cache, k, v, slot_mapping)
    return attend_prefill(q, k, v, k_cache.shape[-1], scale), k_cache, v_cache
