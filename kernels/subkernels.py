"""Sub-kernels more than one kernel family uses (families import these instead of each other's privates).

Each takes SBUF tiles the caller owns, or returns a new one; none allocates HBM.
"""

import nki.isa as nisa
import nki.language as nl

from .limits import GEMM_MOVING_FMAX

# Weight broadcast: a ones[1, P] x weight[1, N] matmul writes the weight row to all P partitions of a PSUM bank,
# so the weight is read from HBM once (a stride-0 DMA would read it once per partition). N per matmul is capped by
# the moving free size (512), which is also one 2 KiB PSUM bank of fp32.
BROADCAST_COLS = GEMM_MOVING_FMAX


def softmax_rows(probs, x, n: int) -> None:
    """probs[n, C] fp32 = softmax(x) along the free axis. Vector: max, reciprocal, scale; Scalar: exp + sum."""
    neg_max = nl.ndarray((n, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=neg_max, op=nl.maximum, data=x, axis=1, negate=True)
    total = nl.ndarray((n, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(
        dst=probs,
        op=nl.exp,
        data=x,
        bias=neg_max,
        reduce_op=nl.add,
        reduce_res=total,
        reduce_cmd=nisa.reduce_cmd.reset_reduce,
    )
    inv = nl.ndarray((n, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=inv, data=total)
    nisa.tensor_scalar(dst=probs, data=probs, op0=nl.multiply, operand0=inv)


def broadcast_weight(weight, rows: int):
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
