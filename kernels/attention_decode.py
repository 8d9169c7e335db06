"""Decode attention: one new query token per sequence against the paged KV cache, after writing its K/V there.

For a batch of sequences with their own context lengths, ``out[b, h] = softmax_{j < L_b}(scale * q[b, h] .
K_b[j, h // G]) @ V_b[:, h // G]``, where sequence b's tokens live in the cache ``[num_blocks, kv_heads, block_size,
head_dim]`` (vLLM's HND layout, research/vllm.md) at the blocks ``block_tables[b]`` lists, in order. The new token's
K/V are first scattered to ``slot_mapping[b]`` (negative = padding row, skipped), so it attends to itself.

Design: blocks, not tokens, go on partitions. One indirect DMA gathers up to 128 whole blocks of one kv head (``[blocks,
BS * D]``, each partition one contiguous BS x D run of the cache, the block id its row offset), so the block table is
used as the DMA index list as is, with no per-token address arithmetic and few large descriptors. Short contexts (fewer
than 128 blocks) split each block over r partitions (r a power of two, r * blocks <= 128), so the engines still see up
to 128 rows. Column ``s`` of every partition (one token each) is a [rows, D] slice; the Tensor Engine transposes it to
K^T [D, rows] for the scores and contracts P^T [rows, G] with V[:, s] for the output. Scores are thus visited in a
permuted token order, which the softmax does not care about; masking uses each column's true position. The softmax is
online (flash decoding) over chunks of up to 512 columns, so any context length fits. Shapes are static: every sequence
reads all ``max_blocks`` blocks of its table (the Neuron convention of compiled buckets) and positions at or past its
context length are masked.
"""

import nki
import nki.isa as nisa
import nki.language as nl
import torch

from .attention_prefill import (
    MASK_SCORE,
    _check_cache_args,
    _itemsize,
    _softmax_accumulate,
    _softmax_finish,
    _softmax_probs,
    _SoftmaxState,
    _write_kv_cache,
    write_kv_cache_ref,
)
from .attention_ref import attend_decode
from .grid import program_share
from .limits import GEMM_MOVING_FMAX, PMAX, PSUM_BANK_FMAX, SBUF_PARTITION_BYTES, require

BLOCKS_PER_TILE = PMAX  # cache blocks gathered per DMA: one per partition
COLS_PER_CHUNK = GEMM_MOVING_FMAX  # score columns per QK^T matmul (moving free size) and per fp32 PSUM bank
MAX_QUERY_GROUP = PMAX  # query heads per kv head: the rows of the score tile, on partitions
# K and V tiles [128 blocks, BS * D] of one kv head are in SBUF together: 2 * BS * D * itemsize bytes per partition.
# Half the usable SBUF leaves room for the K^T/score/probability chunks; BS = 128 at D = 128 in fp32 is 128 KiB.
KV_TILE_SBUF_BYTES = SBUF_PARTITION_BYTES * 5 // 8
# Score-column positions ([G, chunk] fp32 iota tiles) depend only on the chunk, not on the sequence: they are made
# once and reused for every sequence while they fit this budget (32 chunks of 512 columns: 4,096 tokens at BS 32),
# and remade per sequence beyond it.
POSITIONS_SBUF_BYTES = 64 * 1024
# The first K/V tiles of the next (sequence, kv head) pairs are gathered ahead of the one attended, while these bytes
# per partition hold them, so a pair's cache read does not wait behind the previous pair's Vector work and DMA
# latency (each engine runs its instructions in program order).
PREFETCH_SBUF_BYTES = 48 * 1024
# Pairs attended as one software pipeline (``attend_pairs``): their queries Q^T [D, G], context lengths [G, 1] and
# outputs [G, D] stay in SBUF until the group ends (per partition at most 16 x (G + 1 + D) x 4 bytes).
PIPELINED_PAIRS = 16


def _cols_per_step(blocks: int, block_size: int, group: int) -> int:
    """Block columns s handled per chunk: ``steps * blocks`` scores and ``steps * group`` P^T columns per bank."""
    return max(1, min(block_size, COLS_PER_CHUNK // blocks, PSUM_BANK_FMAX // group))


@nki.jit
def attention_decode(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, scale):
    """Dimensions: B sequences, Hq query heads, Hk kv heads (G = Hq / Hk per kv head), D head_dim, NB cache blocks
    of BS tokens, MB blocks per sequence in the block table.

    Args:    q [B, Hq*D] HBM (the new tokens' queries, after q-norm and RoPE); k, v [B, Hk*D] HBM, the new tokens'
             keys and values, same dtype as q and the cache (bf16 or fp32);
             k_cache, v_cache [NB, Hk, BS, D] HBM (vLLM HND layout), updated in place and returned;
             slot_mapping [B] int32 HBM: where the new token goes (block * BS + offset; negative = padding);
             block_tables [B, MB] int32 HBM: the blocks of each sequence in position order; every entry must be a
             valid block index (entries past a sequence's length are read and masked, e.g. 0);
             context_lens [B] int32 HBM: tokens of each sequence including the new one (1 <= L_b <= MB * BS);
             scale: float, the softmax scale (1/sqrt(D) for Qwen3).
    Returns: (out [B, Hq*D] in q's dtype, k_cache, v_cache), all nl.shared_hbm.
    Tiling:  _write_kv_cache first (indirect-DMA scatter). Per sequence b and kv head g: Q^T [D, G] by strided DMA;
             L_b broadcast to G partitions (DMA casts to fp32); per tile of up to 128 table entries (the first tile of
             the next pairs gathered ahead, within PREFETCH_SBUF_BYTES): the block ids
             (DMA; with a split r > 1 each id r times, row = id * Hk * r + part on Vector/GpSimd) drive two
             indirect-DMA gathers K, V [blocks * r, BS / r * D]; per chunk of columns s (<= 512 scores):
             Tensor transposes K[:, s] to K^T [D, blocks] (one PSUM bank), Vector copies it to SBUF, Tensor computes
             S = Q K^T [G, chunk] in PSUM; GpSimd iota gives each column's position, Vector compares it with L_b and
             select_reduce masks and takes the row max in one pass; Scalar exp with row sums (online softmax, fp32
             statistics); Tensor transposes P per column s to P^T [blocks, G] and accumulates P @ V [G, D] in PSUM;
             Vector rescales into the fp32 accumulator. Chunks are pipelined by one across the pairs of a group of
             PIPELINED_PAIRS (``attend_pairs``): the next chunk's scores, of this pair or the next, are issued before
             this chunk's softmax and P @ V. Finally acc / l in q's dtype, DMA to out.
    Grid:    ``attention_decode[g]`` (LNC=2: g = 2) splits the B sequences into g contiguous shares, one per program
             (physical core): each writes its sequences' new K/V into the cache, then attends over them, so no
             program reads a slot another writes (sequences own the blocks their new tokens go to). B = 1 runs on
             one core.
    Limits:  D <= 128; Hq a multiple of Hk and G = Hq / Hk <= 128; BS a power of two with 2*BS*D*itemsize <=
             KV_TILE_SBUF_BYTES (BS <= 128 at D = 128 in fp32); NB*Hk*BS <= 2^24; q, k, v, caches of one float
             dtype; slot_mapping, block_tables, context_lens int32. Context lengths are data: out of range values
             are not detected (0 gives a finite but meaningless row).
    """
    where = "attention_decode"
    require(len(q.shape) == 2, where, f"q.shape={tuple(q.shape)}; must be 2-D [B, Hq*D]")
    B = q.shape[0]
    require(B >= 1, where, f"B={B}; must be >= 1")
    nb, hk, bs, d = _check_cache_args(where, k, v, k_cache, v_cache, slot_mapping, B)
    require(q.shape[1] % d == 0, where, f"q.shape[1]={q.shape[1]}; must be a multiple of head_dim={d}")
    hq = q.shape[1] // d
    require(hq % hk == 0, where, f"q heads={hq}, kv heads={hk}; q heads must be a multiple of kv heads (GQA)")
    group = hq // hk
    require(group <= MAX_QUERY_GROUP, where, f"q heads per kv head={group}; must be <= {MAX_QUERY_GROUP}")
    require(q.dtype == k.dtype, where, f"q dtype={q.dtype}, k dtype={k.dtype}; must be equal (one matmul dtype)")
    require(
        len(block_tables.shape) == 2 and block_tables.shape[0] == B,
        where,
        f"block_tables.shape={tuple(block_tables.shape)}; must be ({B}, max_blocks)",
    )
    require(tuple(context_lens.shape) == (B,), where, f"context_lens.shape={tuple(context_lens.shape)}; must be ({B},)")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens)):
        require(str(t.dtype).endswith("int32"), where, f"{name} dtype={t.dtype}; must be int32")
    tile_bytes = 2 * bs * d * _itemsize(k.dtype)
    require(
        tile_bytes <= KV_TILE_SBUF_BYTES,
        where,
        f"block_size={bs}, head_dim={d}: K/V block tiles need {tile_bytes} B per partition; must be <= "
        f"{KV_TILE_SBUF_BYTES}",
    )

    # this program's sequences (all of them without a grid): it writes their new K/V, then reads them back
    first, last = program_share(B)
    if last > first:
        _write_kv_cache(k_cache, v_cache, k[first:last], v[first:last], slot_mapping[first:last])

    out = nl.ndarray((B, hq * d), dtype=q.dtype, buffer=nl.shared_hbm)
    positions_cache = _PositionTiles(group)
    pairs = [(b, g) for b in range(first, last) for g in range(hk)]
    ahead = max(1, PREFETCH_SBUF_BYTES // first_tile_bytes(k_cache, block_tables))
    for p0 in range(0, len(pairs), PIPELINED_PAIRS):
        # this group's small loads first (they would queue behind the gathers), then the pairs pipelined
        items = []
        for b, g in pairs[p0 : p0 + PIPELINED_PAIRS]:
            ctx_len = nl.ndarray((group, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(dst=ctx_len, src=context_lens.ap(pattern=[[0, group], [1, 1]], offset=b))
            q_t = nl.ndarray((d, group), dtype=q.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=q_t, src=q.ap(pattern=[[1, d], [d, group]], offset=b * hq * d + g * group * d))
            items.append((q_t, b, g, ctx_len, None, None))
        outs = attend_pairs(items, k_cache, v_cache, block_tables, positions_cache, scale, q.dtype, ahead)
        for (b, g), o in zip(pairs[p0 : p0 + PIPELINED_PAIRS], outs):
            nisa.dma_copy(dst=out.ap(pattern=[[d, group], [1, d]], offset=b * hq * d + g * group * d), src=o)
    return out, k_cache, v_cache


def _gather_first_pair(k_cache, v_cache, block_tables, b: int, g: int):
    """``gather_first_tile`` of one (sequence, kv head) pair, its block rows computed here."""
    return gather_first_tile(k_cache, v_cache, first_tile_rows(k_cache, block_tables, b), block_tables, g)


def attend_cached(
    q_t,
    k_cache,
    v_cache,
    block_tables,
    b: int,
    g: int,
    ctx_len,
    positions_cache,
    scale: float,
    dtype,
    new_kv=None,
    first_tile=None,
):
    """One sequence's queries of one kv head against its cached context: ``o [G, D]`` in ``dtype`` (SBUF).

    ``q_t [D, G]`` (SBUF, the query heads of kv head ``g`` as columns), ``ctx_len [G, 1]`` fp32 (the cached tokens
    attended, on every row), ``positions_cache`` a ``_PositionTiles(G)``. Per tile of up to 128 table entries the
    blocks are gathered, then per chunk of columns the scores and the online softmax (the ``attention_decode``
    docstring's "Tiling"). ``new_kv``: (k [D, 1], v [D, 1]) SBUF columns of one more token, attended last
    (``_new_token_accumulate``), for a caller that has not written it to the cache. ``first_tile``: the first
    tile's K/V as ``gather_first_tile`` returned them, for a caller that issued that gather early.
    """
    item = (q_t, b, g, ctx_len, new_kv, first_tile)
    return attend_pairs([item], k_cache, v_cache, block_tables, positions_cache, scale, dtype, 0)[0]


def attend_pairs(items, k_cache, v_cache, block_tables, positions_cache, scale: float, dtype, ahead: int):
    """``attend_cached`` for several (sequence, kv head) pairs: their outputs ``o [G, D]`` (SBUF, ``dtype``) in order.

    ``items``: ``(q_t, b, g, ctx_len, new_kv, first_tile)`` each, as ``attend_cached``'s arguments. The pairs whose
    ``first_tile`` is None get it gathered ``ahead`` pairs early (0: when attended). Software-pipelined by one chunk
    across the pairs: the scores of the next chunk, of this pair or the next, are issued before this chunk's softmax
    and P @ V, so the Tensor Engine computes them while Scalar and Vector work on this one (each engine runs its
    instructions in program order). Same instructions and online-softmax order per pair as one at a time.
    """
    max_blocks, bs = block_tables.shape[1], k_cache.shape[2]
    tiles = [items[i][5] for i in range(len(items))]
    for i in range(min(ahead, len(items))):
        if tiles[i] is None:
            tiles[i] = _gather_first_pair(k_cache, v_cache, block_tables, items[i][1], items[i][2])
    outs = []
    states = []
    pending = None  # (pair index, scored chunk)
    for i in range(len(items)):
        later = i + ahead
        if ahead and later < len(items) and tiles[later] is None:
            tiles[later] = _gather_first_pair(k_cache, v_cache, block_tables, items[later][1], items[later][2])
        q_t, b, g, ctx_len = items[i][0], items[i][1], items[i][2], items[i][3]
        states.append(_SoftmaxState())
        for t0 in range(0, max_blocks, BLOCKS_PER_TILE):
            n = min(BLOCKS_PER_TILE, max_blocks - t0)
            split = _block_split(n, bs)
            if t0 == 0 and tiles[i] is not None:
                k_sb, v_sb = tiles[i]
            else:
                k_sb, v_sb = _gather_blocks(k_cache, v_cache, block_tables, b, g, t0, n, split)
            rows, cols = n * split, bs // split
            steps = _cols_per_step(rows, cols, q_t.shape[1])
            for s0 in range(0, cols, steps):
                ns = min(steps, cols - s0)
                positions = positions_cache.get(t0 * bs + s0, ns, rows, cols)
                scored = _chunk_scores(q_t, k_sb, v_sb, ctx_len, positions, s0, ns)
                if pending is not None:
                    _chunk_accumulate(states[pending[0]], pending[1], scale)
                    if pending[0] != i:  # that was the previous pair's last chunk
                        outs.append(_pair_finish(states[pending[0]], items[pending[0]], scale, dtype))
                pending = (i, scored)
    _chunk_accumulate(states[pending[0]], pending[1], scale)
    outs.append(_pair_finish(states[pending[0]], items[pending[0]], scale, dtype))
    return outs


def _pair_finish(state, item, scale: float, dtype):
    """A pair's output once its cached context is accumulated: its new token's K/V (if any) last, then acc / l."""
    new_kv = item[4]
    if new_kv is not None:
        _new_token_accumulate(state, item[0], new_kv[0], new_kv[1], scale)
    return _softmax_finish(state, dtype)


def _new_token_accumulate(state, q_t, k_col, v_col, scale: float) -> None:
    """One online-softmax step on a single token given as SBUF columns ``k_col, v_col [D, 1]``: Tensor: its score
    q . k [G, 1]; the softmax step (the score is its own row max); Tensor: P^T [1, G] and V^T [1, D] by transposes,
    then P @ V as a one-row contraction [G, D]."""
    d, group = q_t.shape
    s_psum = nl.ndarray((group, 1), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=s_psum, stationary=q_t, moving=k_col)
    score = nl.ndarray((group, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=score, src=s_psum)
    probs = nl.ndarray((group, 1), dtype=v_col.dtype, buffer=nl.sbuf)
    alpha = _softmax_probs(state, score, score, probs, scale)
    p_t_psum = nl.ndarray((1, group), dtype=probs.dtype, buffer=nl.psum)
    nisa.nc_transpose(dst=p_t_psum, data=probs)
    p_t = nl.ndarray((1, group), dtype=probs.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=p_t, src=p_t_psum)
    v_psum = nl.ndarray((1, d), dtype=v_col.dtype, buffer=nl.psum)
    nisa.nc_transpose(dst=v_psum, data=v_col)
    v_row = nl.ndarray((1, d), dtype=v_col.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=v_row, src=v_psum)
    pv = nl.ndarray((group, d), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=pv, stationary=p_t, moving=v_row)
    _softmax_accumulate(state, alpha, pv)


def first_tile_rows(k_cache, block_tables, b: int):
    """The row indices ``attend_cached`` gathers the first tile of sequence b by (table entries 0 .. 127), for a
    caller that issues that gather early: ``gather_first_tile(k_cache, v_cache, rows, block_tables, g)``."""
    n = min(BLOCKS_PER_TILE, block_tables.shape[1])
    return _block_rows(block_tables, k_cache.shape[1], b, 0, n, _block_split(n, k_cache.shape[2]))


def gather_first_tile(k_cache, v_cache, rows, block_tables, g: int):
    """The first K/V tiles of kv head g at ``rows`` (``first_tile_rows``), to pass as ``attend_cached``'s
    ``first_tile``."""
    n = min(BLOCKS_PER_TILE, block_tables.shape[1])
    return _gather_rows(k_cache, v_cache, rows, g, n, _block_split(n, k_cache.shape[2]))


def first_tile_bytes(k_cache, block_tables) -> int:
    """SBUF bytes per partition of one ``gather_first_tile`` result (K and V)."""
    n = min(BLOCKS_PER_TILE, block_tables.shape[1])
    bs, d = k_cache.shape[2], k_cache.shape[3]
    return 2 * (bs // _block_split(n, bs)) * d * _itemsize(k_cache.dtype)


def _block_split(blocks: int, block_size: int) -> int:
    """Partitions per block: the largest power of two r <= block_size with blocks * r <= 128, so short contexts
    still use most partitions (each partition then holds block_size / r consecutive tokens)."""
    split = 1
    while split * 2 <= block_size and blocks * split * 2 <= PMAX:
        split *= 2
    return split


def _gather_blocks(k_cache, v_cache, block_tables, b: int, g: int, t0: int, n: int, split: int):
    """Gather table entries t0..t0+n-1 of sequence b, kv head g: K and V [n * split, BS / split * D] in SBUF.

    Partition ``i * split + part`` holds tokens ``part * BS / split ...`` of block i: one contiguous run of the cache.
    """
    ids = _block_rows(block_tables, k_cache.shape[1], b, t0, n, split)
    return _gather_rows(k_cache, v_cache, ids, g, n, split)


def _block_rows(block_tables, hk: int, b: int, t0: int, n: int, split: int):
    """[n * split, 1] int32: the DMA row index of each partition of a gathered tile (``_gather_blocks``). split ==
    1: the block ids as loaded. split > 1: the ids loaded ``split`` times each (stride-0 DMA pattern), and the row in
    the cache viewed as [NB * Hk * split, BS / split * D] is ``id * Hk * split + part`` (Vector/GpSimd integer ops;
    kv head g is the static offset g * BS * D)."""
    rows = n * split
    max_blocks = block_tables.shape[1]
    ids = nl.ndarray((rows, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=ids, src=block_tables.ap(pattern=[[1, n], [0, split]], offset=b * max_blocks + t0))
    if split > 1:
        part = nl.ndarray((rows, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.iota(dst=part, pattern=[[0, 1]], offset=0, channel_multiplier=1)
        nisa.tensor_scalar(dst=part, data=part, op0=nl.bitwise_and, operand0=split - 1)
        nisa.tensor_scalar(dst=ids, data=ids, op0=nl.multiply, operand0=float(hk * split))
        nisa.tensor_tensor(dst=ids, data1=ids, data2=part, op=nl.add)
    return ids


def _gather_rows(k_cache, v_cache, ids, g: int, n: int, split: int):
    """Two indirect-DMA gathers (K, V) of the rows ``ids`` (``_block_rows``) of kv head g."""
    nb, hk, bs, d = k_cache.shape
    rows, cols = n * split, bs // split
    tiles = []
    for cache in (k_cache, v_cache):
        rows_view = cache.reshape((nb, hk * bs * d)) if split == 1 else cache.reshape((nb * hk * split, cols * d))
        stride = hk * bs * d if split == 1 else cols * d
        dst = nl.ndarray((rows, cols * d), dtype=cache.dtype, buffer=nl.sbuf)
        nisa.dma_copy(
            dst=dst,
            src=rows_view.ap(pattern=[[stride, rows], [1, cols * d]], offset=g * bs * d, vector_offset=ids),
        )
        tiles.append(dst)
    return tiles


class _PositionTiles(nl.NKIObject):
    """Per chunk, the position of each score column as a [G, width] fp32 tile (GpSimd iota): column ``j * n + i`` is
    column j of partition i, each partition holding ``cols`` consecutive tokens from ``pos0 + i * cols``. Tiles are
    kept for reuse by later sequences until POSITIONS_SBUF_BYTES are used."""

    def __init__(self, group: int) -> None:
        self.group = group
        self.tiles: dict = {}
        self.bytes = 0

    def get(self, pos0: int, ns: int, rows: int, cols: int):
        key = f"{pos0}:{ns}:{rows}:{cols}"  # string keys: the only dict keys NKI 0.6 kernels may use
        if key in self.tiles:
            return self.tiles[key]
        width = ns * rows
        tile = nl.ndarray((self.group, width), dtype=nl.float32, buffer=nl.sbuf)
        nisa.iota(dst=tile, pattern=[[1, ns], [cols, rows]], offset=pos0)
        if self.bytes + 4 * width <= POSITIONS_SBUF_BYTES:
            self.tiles[key] = tile
            self.bytes += 4 * width
        return tile


def _chunk_scores(q_t, k_sb, v_sb, ctx_len, positions, s0: int, ns: int):
    """Columns s0..s0+ns-1 of one gathered tile (n partitions of consecutive tokens): the scores Q K^T, masked by
    ``positions < ctx_len``, with their row max. Returns what ``_chunk_accumulate`` takes."""
    d, group = q_t.shape
    n = k_sb.shape[0]
    width = ns * n
    k_t_psum = nl.ndarray((d, width), dtype=k_sb.dtype, buffer=nl.psum)
    for j in range(ns):
        s = s0 + j
        nisa.nc_transpose(dst=k_t_psum[:, j * n : (j + 1) * n], data=k_sb[:, s * d : (s + 1) * d])
    k_t = nl.ndarray((d, width), dtype=k_sb.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=k_t, src=k_t_psum)
    s_psum = nl.ndarray((group, width), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=s_psum, stationary=q_t, moving=k_t, accumulate=False)

    valid = nl.ndarray((group, width), dtype=nl.uint8, buffer=nl.sbuf)
    # GpSimd, not Vector: the Vector Engine is the busiest one here (PSUM evictions, select_reduce, softmax updates)
    nisa.tensor_scalar(dst=valid, data=positions, op0=nl.less, operand0=ctx_len, engine=nisa.gpsimd_engine)
    scores = nl.ndarray((group, width), dtype=nl.float32, buffer=nl.sbuf)
    tile_max = nl.ndarray((group, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.select_reduce(
        dst=scores,
        predicate=valid,
        on_true=s_psum,
        on_false=MASK_SCORE,
        reduce_res=tile_max,
        reduce_cmd=nisa.reduce_cmd.reset_reduce,
        reduce_op=nl.maximum,
    )
    return scores, tile_max, v_sb, s0, ns, d


def _chunk_accumulate(state, scored, scale: float) -> None:
    """One online-softmax step on a chunk's scores (``_chunk_scores``) and its P @ V accumulation."""
    scores, tile_max, v_sb, s0, ns, d = scored
    group, n = scores.shape[0], v_sb.shape[0]
    probs = nl.ndarray(scores.shape, dtype=v_sb.dtype, buffer=nl.sbuf)
    alpha = _softmax_probs(state, scores, tile_max, probs, scale)

    p_t_psum = nl.ndarray((n, ns * group), dtype=probs.dtype, buffer=nl.psum)
    for j in range(ns):
        nisa.nc_transpose(dst=p_t_psum[:, j * group : (j + 1) * group], data=probs[:, j * n : (j + 1) * n])
    p_t = nl.ndarray((n, ns * group), dtype=probs.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=p_t, src=p_t_psum)
    pv = nl.ndarray((group, d), dtype=nl.float32, buffer=nl.psum)
    for j in range(ns):
        s = s0 + j
        nisa.nc_matmul(
            dst=pv,
            stationary=p_t[:, j * group : (j + 1) * group],
            moving=v_sb[:, s * d : (s + 1) * d],
            accumulate=j > 0,
        )
    _softmax_accumulate(state, alpha, pv)


# ----- reference ---------------------------------------------------------------------------------------------------
def attention_decode_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain fp32: write the new K/V, then per sequence gather its context from the cache and attend
    (``attention_ref``)."""
    k_cache, v_cache = write_kv_cache_ref(k_cache, v_cache, k, v, slot_mapping)
    return attend_decode(q, k_cache, v_cache, block_tables, context_lens, scale), k_cache, v_cache
