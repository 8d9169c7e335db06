"""SwiGLU's gating for the dense MLP: ``silu(gate) * up`` from the fused gate/up projection's output.

``gate_up [T, 2I]`` holds gate in columns ``0..I-1`` and up in ``I..2I-1`` (vLLM's ``MergedColumnParallelLinear``
order, per rank). Rounded where Hugging Face's ``LlamaMLP`` / ``Qwen3MLP`` round in the activation dtype:
``silu(gate)`` is computed in fp32 and rounded to the activation dtype, then multiplied by ``up`` and rounded again.

An element-wise kernel, so the layout is free; two, chosen per call by ``_use_spread_layout``:

- ``rows`` (token on partitions, I in the free axis by chunks of ``ROW_CHUNK``): long contiguous DMA runs; every
  lane busy once T >= 128.
- ``spread`` (decode: few tokens): each token's I values spread over the 128 partitions (``i = p * (I/128) + f``),
  so a one-token call runs I/128 elements per lane instead of I on one lane. Needs I % 128 == 0.
"""

import nki
import nki.isa as nisa
import nki.language as nl

from .limits import PMAX, SBUF_PARTITION_BYTES, require

ROW_CHUNK = 2048  # free-axis elements per rows-layout tile: 4 tiles (gate, up, silu, out) of 8 KiB fp32 at most
_TILES = 4  # gate, up, silu(gate) and the product, per element and partition
# The spread layout moves runs of I/128 elements per token and partition (64 B at I = 4096 bf16, under the 4 KiB per
# partition row the performance guide asks for, research/nki.md 2.1), the rows layout whole rows; so spread is taken
# only for the few-token calls where rows would leave 127 lanes idle (the same rule as rmsnorm's h layout).
SPREAD_MAX_TOKEN_BYTES = 64


def _use_spread_layout(T: int, inter: int, itemsize: int) -> bool:
    fits = _TILES * T * (inter // PMAX) * 4 <= SBUF_PARTITION_BYTES
    return inter % PMAX == 0 and T * itemsize <= SPREAD_MAX_TOKEN_BYTES and fits


def _gate_up_tile(dst_dtype, shape, gate_src, up_src, out_dst) -> None:
    """Load gate and up, silu (Scalar, rounded to the activation dtype), multiply (Vector), store."""
    gate = nl.ndarray(shape, dtype=dst_dtype, buffer=nl.sbuf)
    up = nl.ndarray(shape, dtype=dst_dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=gate, src=gate_src)
    nisa.dma_copy(dst=up, src=up_src)
    act = nl.ndarray(shape, dtype=dst_dtype, buffer=nl.sbuf)
    nisa.activation(dst=act, op=nl.silu, data=gate)
    prod = nl.ndarray(shape, dtype=dst_dtype, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=prod, data1=act, data2=up, op=nl.multiply)
    nisa.dma_copy(dst=out_dst, src=prod)


def _spread_view(t, half: int, inter: int):
    """Half ``half`` (width I) of every row of ``t`` as [PMAX, T, I/PMAX]: partition p holds i = p*F .. p*F+F-1."""
    T, width = t.shape
    F = inter // PMAX
    return t.ap([[F, PMAX], [width, T], [1, F]], offset=half * inter)


@nki.jit
def silu_mul(gate_up):
    """``silu(gate) * up`` of each row.

    Dimensions: T tokens, I intermediate size per rank, F = I / 128 (spread layout).

    Args:    gate_up [T, 2I] bf16|fp32 HBM (gate columns first).
    Returns: [T, I] in gate_up's dtype, nl.shared_hbm.
    Tiling:  rows: T by 128 rows on partitions, I by ROW_CHUNK columns; per tile two loads (gate, up), Scalar silu,
             Vector multiply, one store.
             spread (T * itemsize <= 64 B, I % 128 == 0, the four tiles fit SBUF): gate and up loaded as
             [128, T, F], the same three instructions on [128, T, F], one store.
    Limits:  gate_up 2-D with an even, non-zero width and T >= 1.
    """
    require(len(gate_up.shape) == 2, "silu_mul", f"gate_up.shape={tuple(gate_up.shape)}; must be 2-D [T, 2I]")
    T, width = gate_up.shape
    require(
        T >= 1 and width >= 2 and width % 2 == 0,
        "silu_mul",
        f"gate_up.shape={(T, width)}; need T >= 1 and an even, non-zero width 2I",
    )
    inter = width // 2
    dtype = gate_up.dtype
    out = nl.ndarray((T, inter), dtype=dtype, buffer=nl.shared_hbm)
    itemsize = getattr(dtype, "itemsize", 4)
    if _use_spread_layout(T, inter, itemsize):
        shape = (PMAX, T, inter // PMAX)
        _gate_up_tile(
            dtype,
            shape,
            _spread_view(gate_up, 0, inter),
            _spread_view(gate_up, 1, inter),
            _spread_view(out, 0, inter),
        )
        return out
    for r0 in range(0, T, PMAX):
        n = min(PMAX, T - r0)
        for c0 in range(0, inter, ROW_CHUNK):
            w = min(ROW_CHUNK, inter - c0)
            _gate_up_tile(
                dtype,
                (n, w),
                gate_up[r0 : r0 + n, c0 : c0 + w],
                gate_up[r0 : r0 + n, inter + c0 : inter + c0 + w],
                out[r0 : r0 + n, c0 : c0 + w],
            )
    return out
