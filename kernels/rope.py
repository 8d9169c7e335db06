"""Neox-style rotary position embedding (rotate halves) for Qwen3-MoE's q and k, as Hugging Face and vLLM apply it.

For each head ``x = [x1, x2]`` (halves of head_dim D): ``out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]`` with
``cos, sin [D/2]`` the rows of the cos/sin cache at the token's position. The cache rows are gathered in the kernel
by an indirect DMA on the positions, so the wrapper passes vLLM's cache and positions unchanged.

Rounding follows torch's: cos/sin are cast to the activation dtype, every product and sum is rounded to it. For fp32
the result is bit-identical to ``rope.apply_rope``; for bf16 too (bf16 x bf16 products are exact in fp32, and
torch adds bf16 in fp32 then rounds, as the engines do).
"""

import nki
import nki.isa as nisa
import nki.language as nl
import torch

from .limits import PMAX, SBUF_PARTITION_BYTES, require
from .rmsnorm import rms_norm_ref
from .subkernels import broadcast_weight  # one HBM read, Tensor Engine copy
from .views import sbuf_view

ROWS_PER_TILE = PMAX  # one token per partition; all heads of the token in the free axis

QK_LAYOUTS = ("auto", "heads", "tokens")
# qk_norm_rope layouts. "heads": one (token, head) row per partition, q rows then k rows in one tile of
# 128 // (Hq + Hk) tokens, so q and k share every instruction and each streams D elements per lane (decode).
# "tokens": one token per partition, all heads of q (then of k) in the free axis, 128 tokens per tile (prefill).
# auto = heads while T <= QK_HEADS_MAX_TOKENS. Cost model, est us heads vs tokens, Qwen3-30B-A3B bf16 per rank
# (``python -m vllm_nki_moe.tools.kernel_check.cases_norms --layouts``): TP=4 T=1 0.40 vs 2.27, T=32 2.03 vs 2.27,
# T=48 2.88 vs 2.27; TP=1 T=1 0.47 vs 7.53, T=32 7.79 vs 7.53; TP=8 T=32 1.24 vs 1.47, T=48 1.53 vs 1.47. The
# crossover is at T ~ 30-45; 32 keeps decode batch 32 on heads (3% behind at TP=1, 11% ahead at TP=4).
QK_HEADS_MAX_TOKENS = 32


def _check_rope_args(where: str, q, k, positions, cos_sin_cache) -> None:
    require(len(cos_sin_cache.shape) == 2, where, f"cos_sin_cache.shape={tuple(cos_sin_cache.shape)}; must be 2-D")
    D = cos_sin_cache.shape[1]
    require(D >= 2 and D % 2 == 0, where, f"head_dim={D}; must be even (rotate halves)")
    require(len(q.shape) == 2 and len(k.shape) == 2, where, f"q{tuple(q.shape)}, k{tuple(k.shape)}; must be 2-D")
    T = q.shape[0]
    require(k.shape[0] == T, where, f"k.shape[0]={k.shape[0]}; must equal q.shape[0]={T}")
    require(q.shape[1] % D == 0, where, f"q.shape[1]={q.shape[1]}; must be a multiple of head_dim={D}")
    require(k.shape[1] % D == 0, where, f"k.shape[1]={k.shape[1]}; must be a multiple of head_dim={D}")
    require(k.dtype == q.dtype, where, f"k.dtype={k.dtype}; must equal q.dtype={q.dtype}")
    require(tuple(positions.shape) == (T,), where, f"positions.shape={tuple(positions.shape)}; must be ({T},)")
    pos_dtype = str(positions.dtype)
    require("int32" in pos_dtype, where, f"positions.dtype={pos_dtype}; must be int32 (indirect DMA offsets)")
    # SBUF per partition: x, 2 half-size products and the output per tensor (widest of q, k), cos/sin fp32 + cast.
    width = max(q.shape[1], k.shape[1])
    per_partition = width * getattr(q.dtype, "itemsize", 4) * 3 + D * (4 + 4)
    require(
        per_partition <= SBUF_PARTITION_BYTES,
        where,
        f"heads x head_dim={width} needs {per_partition} B of SBUF per partition; must fit {SBUF_PARTITION_BYTES} B",
    )


def _gather_cos_sin(cos_sin_cache, positions, r0: int, n: int, dtype):
    """[n, D] cache rows at positions[r0:r0+n] (indirect DMA gather), cast to ``dtype`` on the Vector Engine."""
    D = cos_sin_cache.shape[1]
    pos = nl.ndarray((n, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=pos, src=positions[r0 : r0 + n])
    cs32 = nl.ndarray((n, D), dtype=cos_sin_cache.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=cs32, src=cos_sin_cache.ap(pattern=[[D, n], [1, D]], vector_offset=pos, indirect_dim=0))
    if cos_sin_cache.dtype == dtype:
        return cs32
    cs = nl.ndarray((n, D), dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=cs, src=cs32)
    return cs


def _rotate_tile(out_tile, x_tile, cs_tile, heads: int, D: int) -> None:
    """out = x * cos + rotate_half(x) * sin for one [n, heads * D] tile; cos/sin broadcast over heads (stride 0).

    Vector Engine, 4 instructions over [n, heads, 2, D/2] views: a = x * [cos, cos], b = x * [sin, sin], then
    out = [a1 - b2, a2 + b1]; products and sums rounded to the tile dtype, as torch rounds them.
    """
    n = x_tile.shape[0]
    half = D // 2
    x = sbuf_view(x_tile, [[D, heads], [half, 2], [1, half]])  # [n, heads, 2, half]

    def out_half(i):  # [n, heads, half]: half i of every head of out_tile
        return sbuf_view(out_tile, [[D, heads], [1, half]], offset=i * half)

    def halves(offset):  # cs_tile's cos (offset 0) or sin (half) as [n, heads, 2, half], stride 0 over heads and halves
        return sbuf_view(cs_tile, [[0, heads], [0, 2], [1, half]], offset=offset)

    a = nl.ndarray((n, heads, 2, half), dtype=x_tile.dtype, buffer=nl.sbuf)
    b = nl.ndarray((n, heads, 2, half), dtype=x_tile.dtype, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=a, data1=x, data2=halves(0), op=nl.multiply)
    nisa.tensor_tensor(dst=b, data1=x, data2=halves(half), op=nl.multiply)
    nisa.tensor_tensor(dst=out_half(0), data1=a[:, :, 0, :], data2=b[:, :, 1, :], op=nl.subtract)
    nisa.tensor_tensor(dst=out_half(1), data1=a[:, :, 1, :], data2=b[:, :, 0, :], op=nl.add)


@nki.jit
def rope(q, k, positions, cos_sin_cache):
    """Neox RoPE of q and k at the given positions.

    Dimensions: T tokens, Hq / Hk q / kv heads (per rank), D head_dim, P cache positions.

    Args:    q [T, Hq*D] bf16|fp32 HBM; k [T, Hk*D] same dtype HBM; positions [T] int32 HBM;
             cos_sin_cache [P, D] fp32 HBM (cos in the first D/2 columns, sin in the last; ops.rope layout).
    Returns: (q_out [T, Hq*D], k_out [T, Hk*D]) in q's dtype, nl.shared_hbm.
    Tiling:  T by ROWS_PER_TILE tokens on partitions; per tile: positions load, one indirect-DMA gather of the
             cache rows (shared by q and k), a cast to the activation dtype (Vector), then per tensor one load,
             4 Vector ops over all heads at once (cos/sin broadcast across heads by stride-0 views), one store.
    Limits:  D even; q and k widths multiples of D; same dtype; positions int32 [T], each in [0, P) (DMA bounds
             check); the widest of q/k fits SBUF.
    """
    _check_rope_args("rope", q, k, positions, cos_sin_cache)
    T = q.shape[0]
    D = cos_sin_cache.shape[1]
    q_out = nl.ndarray(q.shape, dtype=q.dtype, buffer=nl.shared_hbm)
    k_out = nl.ndarray(k.shape, dtype=k.dtype, buffer=nl.shared_hbm)
    for r0 in range(0, T, ROWS_PER_TILE):
        n = min(ROWS_PER_TILE, T - r0)
        cs = _gather_cos_sin(cos_sin_cache, positions, r0, n, q.dtype)
        for src, dst in ((q, q_out), (k, k_out)):
            width = src.shape[1]
            xt = nl.ndarray((n, width), dtype=src.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=xt, src=src[r0 : r0 + n, :])
            ot = nl.ndarray((n, width), dtype=src.dtype, buffer=nl.sbuf)
            _rotate_tile(ot, xt, cs, width // D, D)
            nisa.dma_copy(dst=dst[r0 : r0 + n, :], src=ot)
    return q_out, k_out


def _check_qk_norm_args(where: str, q, k, q_weight, k_weight, eps: float, positions, cos_sin_cache, layout):
    _check_rope_args(where, q, k, positions, cos_sin_cache)
    D = cos_sin_cache.shape[1]
    require(tuple(q_weight.shape) == (D,), where, f"q_weight.shape={tuple(q_weight.shape)}; must be ({D},)")
    require(tuple(k_weight.shape) == (D,), where, f"k_weight.shape={tuple(k_weight.shape)}; must be ({D},)")
    require(eps > 0, where, f"eps={eps}; must be > 0")
    require(layout in QK_LAYOUTS, where, f"layout={layout!r}; must be one of {', '.join(QK_LAYOUTS)}")
    heads = (q.shape[1] + k.shape[1]) // D
    # tokens layout, SBUF per partition: x, normed, weighted, out and the two rope products in the activation dtype
    # and the fp32 squares per tensor width; cos/sin (fp32 + cast) and the broadcast weights per D.
    width, item = max(q.shape[1], k.shape[1]), getattr(q.dtype, "itemsize", 4)
    per_partition = width * (6 * item + 4) + D * (8 + 2 * item)
    require(
        per_partition <= SBUF_PARTITION_BYTES,
        where,
        f"heads x head_dim={width} needs {per_partition} B of SBUF per partition; must fit {SBUF_PARTITION_BYTES} B",
    )
    if layout == "heads":
        require(heads <= PMAX, where, f"q heads + k heads={heads}; layout='heads' needs <= {PMAX} (rows of a token)")


def _norm_rope_tile(out_tile, x_tile, w_tile, cs_tile, eps_tile, heads: int, D: int) -> None:
    """out = rope(w * cast(x * rsqrt(mean(x^2 over each head) + eps))) for one [n, heads * D] tile.

    ``w_tile`` [n, D] (broadcast over heads), ``cs_tile`` [n, D] cos|sin in the tile dtype, ``eps_tile`` [n, 1] fp32.
    heads == 1: Scalar square+reduce, rsqrt, scale (3 instructions); heads > 1: Vector square and reduce per head,
    Scalar rsqrt, Vector scale. Then Vector weight multiply and the 4 rope instructions of _rotate_tile.
    """
    n = x_tile.shape[0]
    normed = nl.ndarray((n, heads * D), dtype=x_tile.dtype, buffer=nl.sbuf)  # Hugging Face's cast point
    rstd = nl.ndarray((n, heads), dtype=nl.float32, buffer=nl.sbuf)
    if heads == 1:
        sq = nl.ndarray((n, D), dtype=nl.float32, buffer=nl.sbuf)
        ss = nl.ndarray((n, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(
            dst=sq, op=nl.square, data=x_tile, reduce_op=nl.add, reduce_res=ss, reduce_cmd=nisa.reduce_cmd.reset_reduce
        )
        nisa.activation(dst=rstd, op=nl.rsqrt, data=ss, scale=1.0 / D, bias=eps_tile[0:n, :])
        nisa.activation(dst=normed, op=nl.copy, data=x_tile, scale=rstd)
    else:
        # Sums of squares per head on the Scalar engine (one square+reduce per head), which keeps the Vector engine
        # (normalise, weight, rope) the only busy one: TP=4 T=128 bf16 3.33 -> 2.13 us est vs a Vector square+reduce.
        sq = nl.ndarray((n, D), dtype=nl.float32, buffer=nl.sbuf)
        ss = nl.ndarray((n, heads), dtype=nl.float32, buffer=nl.sbuf)
        for j in range(heads):
            nisa.activation(
                dst=sq,
                op=nl.square,
                data=sbuf_view(x_tile, [[1, D]], offset=j * D),
                reduce_op=nl.add,
                reduce_res=ss[:, j : j + 1],
                reduce_cmd=nisa.reduce_cmd.reset_reduce,
            )
        nisa.activation(dst=rstd, op=nl.rsqrt, data=ss, scale=1.0 / D, bias=eps_tile[0:n, :])
        nisa.tensor_tensor(
            dst=sbuf_view(normed, [[D, heads], [1, D]]),
            data1=sbuf_view(x_tile, [[D, heads], [1, D]]),
            data2=sbuf_view(rstd, [[1, heads], [0, D]]),
            op=nl.multiply,
        )
    weighted = nl.ndarray((n, heads * D), dtype=x_tile.dtype, buffer=nl.sbuf)
    nisa.tensor_tensor(
        dst=sbuf_view(weighted, [[D, heads], [1, D]]),
        data1=sbuf_view(normed, [[D, heads], [1, D]]),
        data2=sbuf_view(w_tile, [[0, heads], [1, D]], partitions=n),
        op=nl.multiply,
    )
    _rotate_tile(out_tile, weighted, cs_tile, heads, D)


def _qk_norm_rope_heads(q_out, k_out, q, k, q_weight, k_weight, eps, positions, cos_sin_cache) -> None:
    """The heads layout: per tile of n tokens, rows [q (t, h) rows | k (t, h) rows] on partitions (n*(Hq+Hk) <= 128).

    The weights reach their rows by stride-0 DMAs (each row reads D elements of HBM: <= 128 x D, a few KiB), the
    positions by stride-0 DMAs (token t's position on each of its heads' rows), the cache rows by one indirect
    gather per tile.
    """
    T = q.shape[0]
    D = cos_sin_cache.shape[1]
    hq, hk = q.shape[1] // D, k.shape[1] // D
    tokens_per_tile = PMAX // (hq + hk)
    eps_t = nl.ndarray((min(T, tokens_per_tile) * (hq + hk), 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=eps_t, value=float(eps), engine=nisa.gpsimd_engine)
    for t0 in range(0, T, tokens_per_tile):
        n = min(tokens_per_tile, T - t0)
        rq, rk = n * hq, n * hk
        rows = rq + rk
        x = nl.ndarray((rows, D), dtype=q.dtype, buffer=nl.sbuf)
        w = nl.ndarray((rows, D), dtype=q_weight.dtype, buffer=nl.sbuf)
        pos = nl.ndarray((rows, 1), dtype=nl.int32, buffer=nl.sbuf)
        for r0, r, heads, src, weight in ((0, rq, hq, q, q_weight), (rq, rk, hk, k, k_weight)):
            nisa.dma_copy(dst=x[r0 : r0 + r, :], src=src[t0 : t0 + n, :].reshape((r, D)))
            nisa.dma_copy(dst=w[r0 : r0 + r, :], src=weight.ap(pattern=[[0, r], [1, D]]))
            nisa.dma_copy(dst=pos[r0 : r0 + r, :], src=positions.ap(pattern=[[1, n], [0, heads]], offset=t0))
        cs32 = nl.ndarray((rows, D), dtype=cos_sin_cache.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=cs32, src=cos_sin_cache.ap(pattern=[[D, rows], [1, D]], vector_offset=pos, indirect_dim=0))
        cs = cs32
        if cos_sin_cache.dtype != q.dtype:
            cs = nl.ndarray((rows, D), dtype=q.dtype, buffer=nl.sbuf)
            nisa.tensor_copy(dst=cs, src=cs32)
        out = nl.ndarray((rows, D), dtype=q.dtype, buffer=nl.sbuf)
        _norm_rope_tile(out, x, w, cs, eps_t, 1, D)
        nisa.dma_copy(dst=q_out[t0 : t0 + n, :].reshape((rq, D)), src=out[0:rq, :])
        nisa.dma_copy(dst=k_out[t0 : t0 + n, :].reshape((rk, D)), src=out[rq:rows, :])


def _qk_norm_rope_tokens(q_out, k_out, q, k, q_weight, k_weight, eps, positions, cos_sin_cache) -> None:
    """The tokens layout: T by ROWS_PER_TILE tokens on partitions; per tile one gather shared by q and k."""
    T = q.shape[0]
    D = cos_sin_cache.shape[1]
    rows = min(T, ROWS_PER_TILE)
    wq = broadcast_weight(q_weight, rows)
    wk = broadcast_weight(k_weight, rows)
    eps_t = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=eps_t, value=float(eps), engine=nisa.gpsimd_engine)
    for r0 in range(0, T, ROWS_PER_TILE):
        n = min(ROWS_PER_TILE, T - r0)
        cs = _gather_cos_sin(cos_sin_cache, positions, r0, n, q.dtype)
        for src, dst, w in ((q, q_out, wq), (k, k_out, wk)):
            width = src.shape[1]
            xt = nl.ndarray((n, width), dtype=src.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=xt, src=src[r0 : r0 + n, :])
            ot = nl.ndarray((n, width), dtype=src.dtype, buffer=nl.sbuf)
            _norm_rope_tile(ot, xt, w, cs, eps_t, width // D, D)
            nisa.dma_copy(dst=dst[r0 : r0 + n, :], src=ot)


@nki.jit
def qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos_sin_cache, layout="auto"):
    """Qwen3's per-head q/k RMSNorm followed by neox RoPE, in one kernel: ``rope(rms_norm(q), rms_norm(k))``.

    Each head of q and k is normalised over head_dim with its weight (q_weight / k_weight), rounded where Hugging
    Face rounds (normed value, then the weight product, in the activation dtype), then rotated as ``rope`` does.

    Dimensions: T tokens, Hq / Hk q / kv heads (per rank), D head_dim, P cache positions.

    Args:    q [T, Hq*D] bf16|fp32 HBM; k [T, Hk*D] same dtype HBM; q_weight, k_weight [D] HBM; eps float;
             positions [T] int32 HBM; cos_sin_cache [P, D] fp32 HBM (cos | sin halves, ops.rope layout);
             layout "auto" | "heads" | "tokens" (keyword-only; auto = heads while T <= QK_HEADS_MAX_TOKENS).
    Returns: (q_out [T, Hq*D], k_out [T, Hk*D]) in q's dtype, nl.shared_hbm.
    Tiling:  heads: tiles of 128 // (Hq+Hk) tokens, their (token, head) rows on partitions (q rows, then k rows),
             D in the free axis; per tile loads of q, k, their weights (stride-0 DMA per row) and the positions
             (stride-0 per head), one indirect gather of the cache rows, Vector cast; Scalar square+reduce, rsqrt,
             scale; Vector weight multiply and 4 rope ops; two stores.
             tokens: weights broadcast once (Tensor + Vector), T by ROWS_PER_TILE tokens on partitions,
             per tile one gather shared by q and k, then per tensor one load, Vector square + per-head reduce,
             Scalar rsqrt, Vector scale, weight multiply and 4 rope ops over all heads, one store.
    Limits:  those of rope; q_weight, k_weight [D]; eps > 0; layout in QK_LAYOUTS; layout "heads" needs
             Hq + Hk <= 128 (auto takes tokens then).
    """
    _check_qk_norm_args("qk_norm_rope", q, k, q_weight, k_weight, eps, positions, cos_sin_cache, layout)
    D = cos_sin_cache.shape[1]
    q_out = nl.ndarray(q.shape, dtype=q.dtype, buffer=nl.shared_hbm)
    k_out = nl.ndarray(k.shape, dtype=k.dtype, buffer=nl.shared_hbm)
    heads = (q.shape[1] + k.shape[1]) // D
    if layout == "heads" or (layout == "auto" and q.shape[0] <= QK_HEADS_MAX_TOKENS and heads <= PMAX):
        _qk_norm_rope_heads(q_out, k_out, q, k, q_weight, k_weight, eps, positions, cos_sin_cache)
    else:
        _qk_norm_rope_tokens(q_out, k_out, q, k, q_weight, k_weight, eps, positions, cos_sin_cache)
    return q_out, k_out


def rope_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    D = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache.index_select(0, positions.long()).chunk(2, dim=-1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        heads = x.view(x.shape[0], -1, D)
        x1, x2 = heads.chunk(2, dim=-1)
        c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).view(x.shape)

    return rotate(q), rotate(k)


def qk_norm_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    layout: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``layout`` is accepted for the kernel's signature and unused."""
    D = cos_sin_cache.shape[1]
    qn = rms_norm_ref(q.reshape(-1, D), q_weight, eps).reshape(q.shape)
    kn = rms_norm_ref(k.reshape(-1, D), k_weight, eps).reshape(k.shape)
    return rope_ref(qn, kn, positions, cos_sin_cache)
