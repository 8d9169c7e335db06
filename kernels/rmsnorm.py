"""RMSNorm for Qwen3-MoE: the layer norms over the hidden size, the per-head q/k norms, and residual-add + RMSNorm.

``y = weight * (x * rsqrt(mean(x^2) + eps))``, rounded where Hugging Face's ``Qwen3MoeRMSNorm`` rounds: the
normalised value is cast to the activation dtype before the weight multiply. With bf16 activations that is the
same bits as Hugging Face; with fp32 the only differences are summation order and rsqrt (a few fp32 ulps).

Two layouts, chosen per call by ``_use_h_layout`` (or forced with ``layout=``):

- ``rows`` (token on partitions, H in the free axis): every engine lane busy once T >= 128; for few tokens the
  Scalar/Vector instructions stream the whole row on one lane (T=1, H=2048: 2,048 cycles each).
- ``h`` (H on partitions, ``h = p * (H/128) + f``; decode): each token's row is spread over the 128 partitions, the
  per-partition sums of squares are added across partitions by one Tensor Engine matmul with an all-ones [128, 128]
  stationary, which also broadcasts the total to every partition. Needs H % 128 == 0.
"""

import nki
import nki.isa as nisa
import nki.language as nl
import torch

from .limits import GEMM_MOVING_FMAX, PMAX, SBUF_PARTITION_BYTES, require
from .subkernels import broadcast_weight
from .views import rows_over_partitions, sbuf_view

ROWS_PER_TILE = PMAX  # one row (token, or token x head) per partition
# SBUF per partition: x, the normalised row, the output (activation dtype) and the broadcast weight (weight dtype),
# plus for the fused kernel the residual input and new residual (activation dtype); at most 4 B each. Checked
# against limits.SBUF_PARTITION_BYTES with the actual dtypes, so fp32 H <= 8,864 and bf16 H <= 17,728 for the
# fused kernel.
_TILES_PLAIN = 3
_TILES_FUSED = 5

LAYOUTS = ("auto", "rows", "h")
# ``auto`` takes the h layout when H % PMAX == 0, H >= H_LAYOUT_MIN_H and T * itemsize <= H_LAYOUT_MAX_TOKEN_BYTES.
# Cost model, est us of fused_add_rms_norm rows vs h
# (``python -m vllm_nki_moe.tools.kernel_check.cases_norms --layouts``):
#   H=2048 bf16: T=1 3.52 vs 0.24, T=8 3.52 vs 0.56, T=32 3.52 vs 1.65, T=48 3.52 vs 2.37, T=64 3.52 vs 3.09;
#   H=2048 fp32: T=1 3.52 vs 0.30, T=16 3.52 vs 1.66, T=32 3.52 vs 3.10;  H=128 bf16: T=1 0.33 vs 0.21, T=8 equal.
# The model never prefers rows (both become DMA-bound), but it does not see DMA efficiency: the h layout moves
# runs of H/128 elements per token and partition (32 B at H=2048 bf16; the perf guide asks for >= 4 KiB per
# partition row, research/nki.md 2.1), while rows moves whole rows (4 KiB at H=2048 bf16). So h is taken only
# where the model gives it at least a 2x margin: T * itemsize <= 64 B (bf16 T <= 32, fp32 T <= 16); and not for
# H < 512, where rows instructions are already within a few MIN_II and h would move 2-to-6-byte runs (H=128: 0.32
# vs 0.27 us, not worth it).
H_LAYOUT_MAX_TOKEN_BYTES = 64
H_LAYOUT_MIN_H = 4 * PMAX
# Cross-partition sum: an all-ones [128, 128] fp32 stationary times the [128, T] partial sums gives the total on every
# partition in one Tensor instruction (max(64, 4T) cycles at 2.4 GHz: 27 ns at T <= 16). The GpSimd alternative,
# nisa.tensor_partition_reduce (64 cycles at 1.2 GHz = 53 ns, cost.py), leaves the total on one partition and still
# needs a broadcast matmul, so the ones matmul is cheaper and one instruction shorter.
H_LAYOUT_TOKENS_PER_CHUNK = GEMM_MOVING_FMAX  # the partial sums are the matmul's moving operand (free size <= 512)


def _itemsize(dtype) -> int:
    return getattr(dtype, "itemsize", 4)


def _check_args(where: str, x, weight, eps: float, tiles: int) -> None:
    require(len(x.shape) == 2, where, f"x.shape={tuple(x.shape)}; must be 2-D [T, H] (fold heads into T)")
    T, H = x.shape
    require(T >= 1 and H >= 1, where, f"x.shape={tuple(x.shape)}; T and H must be >= 1")
    require(tuple(weight.shape) == (H,), where, f"weight.shape={tuple(weight.shape)}; must be ({H},)")
    require(eps > 0, where, f"eps={eps}; must be > 0")
    per_partition = H * (tiles * _itemsize(x.dtype) + _itemsize(weight.dtype))
    require(
        per_partition <= SBUF_PARTITION_BYTES,
        where,
        f"H={H} ({x.dtype}) needs {per_partition} B of SBUF per partition; must fit {SBUF_PARTITION_BYTES} B",
    )


def _rms_norm_tile(out_tile, x_tile, w_tile, eps_tile, inv_h: float, round_normed: bool = True) -> None:
    """One [n, H] tile: out = w * cast(x * rsqrt(sum(x^2) / H + eps)) (no cast unless ``round_normed``); the caller
    owns the buffers.

    Scalar: square with add-reduce into ss (fp32; the squares land in ``out_tile`` as scratch), rsqrt(ss/H + eps)
    in one activation, x * rstd (written in the activation dtype: Hugging Face's cast point).
    Vector: the weight multiply.
    """
    n = x_tile.shape[0]
    ss = nl.ndarray((n, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(
        dst=out_tile,
        op=nl.square,
        data=x_tile,
        reduce_op=nl.add,
        reduce_res=ss,
        reduce_cmd=nisa.reduce_cmd.reset_reduce,
    )
    rstd = nl.ndarray((n, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=rstd, op=nl.rsqrt, data=ss, scale=inv_h, bias=eps_tile[0:n, :])
    normed = nl.ndarray(x_tile.shape, dtype=x_tile.dtype if round_normed else nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=normed, op=nl.copy, data=x_tile, scale=rstd)
    nisa.tensor_tensor(dst=out_tile, data1=normed, data2=w_tile[0:n, :], op=nl.multiply)


def _eps_tile(eps: float, rows: int):
    t = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=t, value=float(eps))
    return t


def _use_h_layout(where: str, T: int, H: int, itemsize: int, layout: str) -> bool:
    """Whether the call runs the H-on-partitions layout (see H_LAYOUT_MAX_TOKEN_BYTES)."""
    require(layout in LAYOUTS, where, f"layout={layout!r}; must be one of {', '.join(LAYOUTS)}")
    if layout == "h":
        require(H % PMAX == 0, where, f"H={H}; layout='h' needs H % {PMAX} == 0 (H spread over the partitions)")
        return True
    small_t = T * itemsize <= H_LAYOUT_MAX_TOKEN_BYTES
    return layout == "auto" and H % PMAX == 0 and H >= H_LAYOUT_MIN_H and small_t


def _rms_norm_h(out, new_residual, x, residual, weight, eps, round_normed: bool = True) -> None:
    """The h layout of rms_norm (``residual`` None) and fused_add_rms_norm; writes ``out`` (and ``new_residual``).

    Tensor: one ones[128,128]^T @ partial[128, n] per chunk (fp32, cross-partition sum broadcast to every partition).
    Scalar: square+reduce (n = 1), rsqrt, scale (n = 1). Vector: residual add, square + reduce and scale (n > 1),
    weight multiply. GpSimd: the constant tiles.
    """
    T, H = x.shape
    F = H // PMAX
    w = nl.ndarray((PMAX, F), dtype=weight.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=w, src=weight.reshape((PMAX, F)))
    ones = nl.ndarray((PMAX, PMAX), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0, engine=nisa.gpsimd_engine)
    eps_t = nl.ndarray((PMAX, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=eps_t, value=float(eps), engine=nisa.gpsimd_engine)
    # fp32 scratch (squares) and four activation-dtype tiles per token and partition, at most 4 B each
    chunk = max(1, min(H_LAYOUT_TOKENS_PER_CHUNK, SBUF_PARTITION_BYTES // (5 * 4 * F + 8)))
    for r0 in range(0, T, chunk):
        n = min(chunk, T - r0)
        xt = nl.ndarray((PMAX, n, F), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=xt, src=rows_over_partitions(x, r0, n))
        if residual is not None:
            rt = nl.ndarray((PMAX, n, F), dtype=x.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=rt, src=rows_over_partitions(residual, r0, n))
            nisa.tensor_tensor(dst=xt, data1=xt, data2=rt, op=nl.add)  # rounded to x's dtype, as torch adds
            nisa.dma_copy(dst=rows_over_partitions(new_residual, r0, n), src=xt)
        partial = nl.ndarray((PMAX, n), dtype=nl.float32, buffer=nl.sbuf)
        ot = nl.ndarray((PMAX, n, F), dtype=x.dtype, buffer=nl.sbuf)
        if n == 1:
            sq = nl.ndarray((PMAX, F), dtype=nl.float32, buffer=nl.sbuf)
            nisa.activation(
                dst=sq,
                op=nl.square,
                data=xt[:, 0, :],
                reduce_op=nl.add,
                reduce_res=partial,
                reduce_cmd=nisa.reduce_cmd.reset_reduce,
            )
        else:
            sq = nl.ndarray((PMAX, n, F), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=sq, data1=xt, data2=xt, op=nl.multiply)
            nisa.tensor_reduce(dst=partial, op=nl.add, data=sq, axis=2)
        total = nl.ndarray((PMAX, n), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=total, stationary=ones, moving=partial, accumulate=False)
        rstd = nl.ndarray((PMAX, n), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=rstd, op=nl.rsqrt, data=total, scale=1.0 / H, bias=eps_t)
        # Hugging Face's cast point (round_normed), or fp32 until the weight multiply (NxDI's CustomRMSNorm)
        normed = nl.ndarray((PMAX, n, F), dtype=x.dtype if round_normed else nl.float32, buffer=nl.sbuf)
        if n == 1:
            nisa.activation(dst=normed[:, 0, :], op=nl.copy, data=xt[:, 0, :], scale=rstd)
        else:
            nisa.tensor_tensor(dst=normed, data1=xt, data2=sbuf_view(rstd, [[1, n], [0, F]]), op=nl.multiply)
        nisa.tensor_tensor(dst=ot, data1=normed, data2=sbuf_view(w, [[0, n], [1, F]]), op=nl.multiply)
        nisa.dma_copy(dst=rows_over_partitions(out, r0, n), src=ot)


@nki.jit
def rms_norm(x, weight, eps, layout="auto", round_normed=True):
    """RMSNorm of each row of x.

    Dimensions: T rows (tokens, or tokens x heads for the q/k norm), H normalised size (hidden, or head_dim),
    F = H / 128 (h layout).

    Args:    x [T, H] bf16|fp32 HBM; weight [H] bf16|fp32 HBM; eps float;
             layout "auto" | "rows" | "h" (auto = h for few tokens, see H_LAYOUT_MAX_TOKEN_BYTES);
             round_normed: True rounds the normalised value to x's dtype before the weight multiply (Hugging Face's
             Qwen3MoeRMSNorm), False keeps it fp32 (NxDI's CustomRMSNorm: one rounding, at the end).
    Returns: [T, H] in x's dtype, nl.shared_hbm.
    Tiling:  rows: weight broadcast to all partitions once (broadcast_weight: Tensor + Vector); T by ROWS_PER_TILE
             rows on partitions, H whole in the free axis; per tile one load, Scalar square+reduce, rsqrt, scale,
             Vector weight multiply, one store.
             h: x loaded as [128, T, F] (partition p holds h = p*F .. p*F+F-1 of every token), weight as [128, F];
             per chunk of <= 512 tokens: squares summed over F per partition (Scalar for T=1, else Vector square +
             reduce), Tensor ones-matmul across partitions into PSUM (total on every partition), Scalar rsqrt,
             scale by rstd, Vector weight multiply, one store. fp32 math throughout; results rounded to x's dtype.
    Limits:  x 2-D; weight [H]; eps > 0; layout in LAYOUTS; rows: H small enough that 3 [P, H] activation tiles and the
             weight fit SBUF; h: H % 128 == 0.
    """
    _check_args("rms_norm", x, weight, eps, _TILES_PLAIN)
    T, H = x.shape
    out = nl.ndarray((T, H), dtype=x.dtype, buffer=nl.shared_hbm)
    if _use_h_layout("rms_norm", T, H, _itemsize(x.dtype), layout):
        _rms_norm_h(out, None, x, None, weight, eps, round_normed)
        return out
    rows = min(T, ROWS_PER_TILE)
    w_all = broadcast_weight(weight, rows)
    eps_all = _eps_tile(eps, rows)
    for r0 in range(0, T, ROWS_PER_TILE):
        n = min(ROWS_PER_TILE, T - r0)
        xt = nl.ndarray((n, H), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=xt, src=x[r0 : r0 + n, :])
        ot = nl.ndarray((n, H), dtype=x.dtype, buffer=nl.sbuf)
        _rms_norm_tile(ot, xt, w_all, eps_all, 1.0 / H, round_normed)
        nisa.dma_copy(dst=out[r0 : r0 + n, :], src=ot)
    return out


@nki.jit
def fused_add_rms_norm(x, residual, weight, eps, layout="auto"):
    """Residual add then RMSNorm: ``new_residual = x + residual``; ``out = rms_norm(new_residual)``.

    Dimensions: T tokens, H hidden size.

    Args:    x [T, H] bf16|fp32 HBM; residual [T, H] same dtype HBM; weight [H] HBM; eps float;
             layout "auto" | "rows" | "h" (keyword-only, as rms_norm).
    Returns: (out [T, H], new_residual [T, H]), both x's dtype, nl.shared_hbm.
    Tiling:  as rms_norm (same layout choice), plus per tile a residual load, a Vector add (rounded to the
             activation dtype, as torch adds) and a store of the sum; the norm reads the rounded sum, as Hugging
             Face does.
    Limits:  those of rms_norm; residual.shape == x.shape and residual.dtype == x.dtype.
    """
    _check_args("fused_add_rms_norm", x, weight, eps, _TILES_FUSED)
    require(
        tuple(residual.shape) == tuple(x.shape),
        "fused_add_rms_norm",
        f"residual.shape={tuple(residual.shape)}; must equal x.shape={tuple(x.shape)}",
    )
    require(
        residual.dtype == x.dtype,
        "fused_add_rms_norm",
        f"residual.dtype={residual.dtype}; must equal x.dtype={x.dtype}",
    )
    T, H = x.shape
    out = nl.ndarray((T, H), dtype=x.dtype, buffer=nl.shared_hbm)
    new_residual = nl.ndarray((T, H), dtype=x.dtype, buffer=nl.shared_hbm)
    if _use_h_layout("fused_add_rms_norm", T, H, _itemsize(x.dtype), layout):
        _rms_norm_h(out, new_residual, x, residual, weight, eps)
        return out, new_residual
    rows = min(T, ROWS_PER_TILE)
    w_all = broadcast_weight(weight, rows)
    eps_all = _eps_tile(eps, rows)
    for r0 in range(0, T, ROWS_PER_TILE):
        n = min(ROWS_PER_TILE, T - r0)
        xt = nl.ndarray((n, H), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=xt, src=x[r0 : r0 + n, :])
        rt = nl.ndarray((n, H), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=rt, src=residual[r0 : r0 + n, :])
        st = nl.ndarray((n, H), dtype=x.dtype, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=st, data1=xt, data2=rt, op=nl.add)
        nisa.dma_copy(dst=new_residual[r0 : r0 + n, :], src=st)
        ot = nl.ndarray((n, H), dtype=x.dtype, buffer=nl.sbuf)
        _rms_norm_tile(ot, st, w_all, eps_all, 1.0 / H)
        nisa.dma_copy(dst=out[r0 : r0 + n, :], src=ot)
    return out, new_residual


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, layout: str = "auto", round_normed: bool = True
) -> torch.Tensor:
    """``layout`` is accepted for the kernel's signature and unused (both layouts compute the same values);
    ``round_normed``: Hugging Face's rounding (the normalised value cast to x's dtype before the weight multiply), else
    NxDI's CustomRMSNorm's (fp32 throughout, one cast at the end)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if round_normed:
        normed = normed.to(x.dtype).float()
    return (normed * weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, layout: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(new_residual, weight, eps), new_residual
