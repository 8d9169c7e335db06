"""Neox-style rotary position embedding (rotate halves) for Qwen3-MoE's q and k, as Hugging Face and vLLM apply it.

For each head ``x = [x1, x2]`` (halves of head_dim D): ``out = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]`` with
``cos, sin [D/2]`` the rows of the cos/sin cache at the token's position. The cache rows are gathered in the kernel
by an indirect DMA on the positions, so the wrapper passes vLLM's cache and positions unchanged.

Rounding follows torch's: cos/sin are cast to the activation dtype, every product and sum is rounded to it. For fp32
the result is bit-identical to ``ops_torch.apply_rope``; for bf16 too (bf16 x bf16 products are exact in fp32, and
torch adds bf16 in fp32 then rounds, as the engines do).
"""

import nki
import nki.isa as nisa
import nki.language as nl
import torch

from .limits import PMAX, SBUF_PARTITION_BYTES, require

ROWS_PER_TILE = PMAX  # one token per partition; all heads of the token in the free axis


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

    Vector Engine: 4 multiplies and 2 add/subtracts over [n, heads, D/2] views; results rounded to the tile dtype.
    """
    n = x_tile.shape[0]
    half = D // 2
    x = x_tile.reshape_dim(1, [heads, D])
    o = out_tile.reshape_dim(1, [heads, D])
    cos = cs_tile[:, 0:half].expand_dim(1).broadcast(1, heads)
    sin = cs_tile[:, half:D].expand_dim(1).broadcast(1, heads)
    x1, x2 = x[:, :, 0:half], x[:, :, half:D]
    a = nl.ndarray((n, heads, half), dtype=x_tile.dtype, buffer=nl.sbuf)
    b = nl.ndarray((n, heads, half), dtype=x_tile.dtype, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=a, data1=x1, data2=cos, op=nl.multiply)
    nisa.tensor_tensor(dst=b, data1=x2, data2=sin, op=nl.multiply)
    nisa.tensor_tensor(dst=o[:, :, 0:half], data1=a, data2=b, op=nl.subtract)
    nisa.tensor_tensor(dst=a, data1=x2, data2=cos, op=nl.multiply)
    nisa.tensor_tensor(dst=b, data1=x1, data2=sin, op=nl.multiply)
    nisa.tensor_tensor(dst=o[:, :, half:D], data1=a, data2=b, op=nl.add)


@nki.jit
def rope(q, k, positions, cos_sin_cache):
    """Neox RoPE of q and k at the given positions.

    Dimensions: T tokens, Hq / Hk q / kv heads (per rank), D head_dim, P cache positions.

    Args:    q [T, Hq*D] bf16|fp32 HBM; k [T, Hk*D] same dtype HBM; positions [T] int32 HBM;
             cos_sin_cache [P, D] fp32 HBM (cos in the first D/2 columns, sin in the last; ops_torch layout).
    Returns: (q_out [T, Hq*D], k_out [T, Hk*D]) in q's dtype, nl.shared_hbm.
    Tiling:  T by ROWS_PER_TILE tokens on partitions; per tile: positions load, one indirect-DMA gather of the
             cache rows (shared by q and k), a cast to the activation dtype (Vector), then per tensor one load,
             6 Vector ops over all heads at once (cos/sin broadcast across heads by stride-0 views), one store.
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
