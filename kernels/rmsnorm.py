"""RMSNorm for Qwen3-MoE: the layer norms over the hidden size, the per-head q/k norms, and residual-add + RMSNorm.

``y = weight * (x * rsqrt(mean(x^2) + eps))``, rounded where Hugging Face's ``Qwen3MoeRMSNorm`` rounds: the
normalised value is cast to the activation dtype before the weight multiply. With bf16 activations that is the
same bits as Hugging Face; with fp32 the only differences are summation order and rsqrt (a few fp32 ulps).
"""

import nki
import nki.isa as nisa
import nki.language as nl
import torch

from .limits import GEMM_MOVING_FMAX, PMAX, SBUF_PARTITION_BYTES, require

ROWS_PER_TILE = PMAX  # one row (token, or token x head) per partition
# Weight broadcast: a ones[1, P] x weight[1, N] matmul writes the weight row to all P partitions of a PSUM bank,
# so the weight is read from HBM once (a stride-0 DMA would read it once per partition). N per matmul is capped by
# the moving free size (512), which is also one 2 KiB PSUM bank of fp32.
BROADCAST_COLS = GEMM_MOVING_FMAX
# SBUF per partition: x, the normalised row, the output (activation dtype) and the broadcast weight (weight dtype),
# plus for the fused kernel the residual input and new residual (activation dtype); at most 4 B each. Checked
# against limits.SBUF_PARTITION_BYTES with the actual dtypes, so fp32 H <= 8,864 and bf16 H <= 17,728 for the
# fused kernel.
_TILES_PLAIN = 3
_TILES_FUSED = 5


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


def _broadcast_weight(weight, rows: int):
    """SBUF [rows, H] copy of ``weight [H]`` on every partition: one HBM read, Tensor Engine broadcast.

    Tensor: ones[1, rows]^T @ w[1, cols] per BROADCAST_COLS columns into PSUM (exact: x1.0 in fp32);
    Vector: PSUM -> SBUF copies in the weight dtype (exact).
    """
    (H,) = weight.shape
    w_row = nl.ndarray((1, H), dtype=weight.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=w_row, src=weight.reshape((1, H)))
    ones = nl.ndarray((1, rows), dtype=weight.dtype, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    w_all = nl.ndarray((rows, H), dtype=weight.dtype, buffer=nl.sbuf)
    for c0 in range(0, H, BROADCAST_COLS):
        cols = min(BROADCAST_COLS, H - c0)
        acc = nl.ndarray((rows, cols), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=acc, stationary=ones, moving=w_row[:, c0 : c0 + cols], accumulate=False)
        nisa.tensor_copy(dst=w_all[:, c0 : c0 + cols], src=acc)
    return w_all


def _rms_norm_tile(out_tile, x_tile, w_tile, eps_tile, inv_h: float) -> None:
    """One [n, H] tile: out = w * cast(x * rsqrt(sum(x^2) / H + eps)); the caller owns the buffers.

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
    normed = nl.ndarray(x_tile.shape, dtype=x_tile.dtype, buffer=nl.sbuf)
    nisa.activation(dst=normed, op=nl.copy, data=x_tile, scale=rstd)
    nisa.tensor_tensor(dst=out_tile, data1=normed, data2=w_tile[0:n, :], op=nl.multiply)


def _eps_tile(eps: float, rows: int):
    t = nl.ndarray((rows, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=t, value=float(eps))
    return t


@nki.jit
def rms_norm(x, weight, eps):
    """RMSNorm of each row of x.

    Dimensions: T rows (tokens, or tokens x heads for the q/k norm), H normalised size (hidden, or head_dim).

    Args:    x [T, H] bf16|fp32 HBM; weight [H] bf16|fp32 HBM; eps float.
    Returns: [T, H] in x's dtype, nl.shared_hbm.
    Tiling:  weight broadcast to all partitions once (_broadcast_weight: Tensor + Vector); T by ROWS_PER_TILE
             rows on partitions, H whole in the free axis; per tile one load, Scalar square+reduce, rsqrt, scale,
             Vector weight multiply, one store. fp32 math throughout; results rounded to x's dtype.
    Limits:  x 2-D; weight [H]; eps > 0; H small enough that 3 [P, H] activation tiles and the weight fit SBUF.
    """
    _check_args("rms_norm", x, weight, eps, _TILES_PLAIN)
    T, H = x.shape
    out = nl.ndarray((T, H), dtype=x.dtype, buffer=nl.shared_hbm)
    rows = min(T, ROWS_PER_TILE)
    w_all = _broadcast_weight(weight, rows)
    eps_all = _eps_tile(eps, rows)
    for r0 in range(0, T, ROWS_PER_TILE):
        n = min(ROWS_PER_TILE, T - r0)
        xt = nl.ndarray((n, H), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=xt, src=x[r0 : r0 + n, :])
        ot = nl.ndarray((n, H), dtype=x.dtype, buffer=nl.sbuf)
        _rms_norm_tile(ot, xt, w_all, eps_all, 1.0 / H)
        nisa.dma_copy(dst=out[r0 : r0 + n, :], src=ot)
    return out


@nki.jit
def fused_add_rms_norm(x, residual, weight, eps):
    """Residual add then RMSNorm: ``new_residual = x + residual``; ``out = rms_norm(new_residual)``.

    Dimensions: T tokens, H hidden size.

    Args:    x [T, H] bf16|fp32 HBM; residual [T, H] same dtype HBM; weight [H] HBM; eps float.
    Returns: (out [T, H], new_residual [T, H]), both x's dtype, nl.shared_hbm.
    Tiling:  as rms_norm, plus per tile a residual load, a Vector add (rounded to the activation dtype, as torch
             adds) and a store of the sum; the norm reads the rounded sum, as Hugging Face does.
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
    rows = min(T, ROWS_PER_TILE)
    w_all = _broadcast_weight(weight, rows)
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


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(new_residual, weight, eps), new_residual
