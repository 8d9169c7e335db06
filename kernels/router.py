"""Router top-k for Qwen3-MoE: softmax over experts in fp32, the k best experts, optional renormalisation.

Qwen3 routes with ``softmax(logits)`` in fp32, keeps the top ``k`` (8 for Qwen3-30B-A3B) and, with
``norm_topk_prob``, rescales the kept weights to sum to 1.

Ties: equal probabilities are ranked lowest expert index first (``max8`` then ``nc_find_index8``, which pairs
repeated values with successive occurrences in ascending order). ``torch.topk`` does not promise an order among
equal values (on CPU it returned indices [8, 1, 9, 6, 2] for values [5, 3, 3, 3, 3] at 1, 2, 4, 6, 9), so the
reference ranks with a stable descending sort, the order this kernel defines. Exact ties in fp32 router
probabilities are rare in real models; with them, ids can differ from torch.topk's while the weights agree.
"""

import nki
import nki.isa as nisa
import nki.language as nl
import torch

from .limits import GEMM_MOVING_FMAX, PMAX, SBUF_PARTITION_BYTES, TOPK8, TOPK8_MAX_ELEMS, TOPK8_MIN_ELEMS, require
from .subkernels import softmax_rows
from .views import rows_over_partitions

ROWS_PER_TILE = PMAX  # one token per partition, all experts in the free axis
# max8 / nc_find_index8 read at least 8 elements per partition: fewer experts are padded with -inf logits
# (probability 0, and a higher index than every real expert, so they are never preferred in a tie).
MIN_COLS = TOPK8_MIN_ELEMS
# router_topk_matmul: the logits of a token tile are one PSUM tile [T, E] accumulated over the H/128 contraction
# tiles, so E is capped by the matmul's moving free size, which is also one 2 KiB PSUM bank of fp32 (as
# nki-library's router_topk: E <= 512).
MAX_GATE_EXPERTS = GEMM_MOVING_FMAX


def _check_router_args(where: str, logits, top_k: int) -> None:
    require(len(logits.shape) == 2, where, f"logits.shape={tuple(logits.shape)}; must be 2-D [T, E]")
    T, E = logits.shape
    require(T >= 1, where, f"T={T}; must be >= 1")
    require(1 <= E <= TOPK8_MAX_ELEMS, where, f"E={E}; must be 1..{TOPK8_MAX_ELEMS} (max8 elements per partition)")
    require(1 <= top_k <= TOPK8, where, f"top_k={top_k}; must be 1..{TOPK8} (max8 returns 8 values)")
    require(top_k <= E, where, f"top_k={top_k}; must not exceed E={E}")


def _topk_tile(weights, ids, r0: int, x, top_k: int, renormalize: bool) -> None:
    """Softmax, top-k and renormalisation of one logits tile ``x [n, C]`` (SBUF, or PSUM when C >= MIN_COLS);
    stores rows r0..r0+n of ``weights`` and ``ids``. Vector max8 + nc_find_index8, Vector/Scalar softmax."""
    n, cols = x.shape
    probs = nl.ndarray((n, cols), dtype=nl.float32, buffer=nl.sbuf)
    softmax_rows(probs, x, n)
    top = nl.ndarray((n, TOPK8), dtype=nl.float32, buffer=nl.sbuf)
    nisa.max8(dst=top, src=probs)
    idx = nl.ndarray((n, TOPK8), dtype=nl.uint32, buffer=nl.sbuf)
    nisa.nc_find_index8(dst=idx, data=probs, vals=top)
    if renormalize:
        total = nl.ndarray((n, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=total, op=nl.add, data=top[:, 0:top_k], axis=1)
        inv = nl.ndarray((n, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.reciprocal(dst=inv, data=total)
        nisa.tensor_scalar(dst=top[:, 0:top_k], data=top[:, 0:top_k], op0=nl.multiply, operand0=inv)
    idx32 = nl.ndarray((n, top_k), dtype=nl.int32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=idx32, src=idx[:, 0:top_k])  # expert ids < 2^24: exact through the fp32 datapath
    nisa.dma_copy(dst=weights[r0 : r0 + n, :], src=top[:, 0:top_k])
    nisa.dma_copy(dst=ids[r0 : r0 + n, :], src=idx32)


@nki.jit
def router_topk(logits, top_k, renormalize):
    """Softmax, top-k and optional renormalisation of router logits.

    Dimensions: T tokens, E experts, K = top_k.

    Args:    logits [T, E] bf16|fp32 HBM; top_k int; renormalize bool (Qwen3's norm_topk_prob).
    Returns: (weights [T, K] fp32, ids [T, K] int32), best first, nl.shared_hbm.
    Tiling:  T by ROWS_PER_TILE tokens on partitions, E whole in the free axis (padded with -inf to MIN_COLS).
             Per tile: one load; Vector max; Scalar exp(x - max) with add-reduce; Vector reciprocal and scale
             (fp32 probabilities); Vector max8 + nc_find_index8 (top 8 values, their lowest-index positions);
             optional Vector sum + reciprocal + scale of the first K; two stores.
    Limits:  1 <= top_k <= 8 (max8); top_k <= E; E <= 16,384 (max8/nc_find_index8 elements per partition).
    """
    _check_router_args("router_topk", logits, top_k)
    T, E = logits.shape
    cols = max(E, MIN_COLS)
    weights = nl.ndarray((T, top_k), dtype=nl.float32, buffer=nl.shared_hbm)
    ids = nl.ndarray((T, top_k), dtype=nl.int32, buffer=nl.shared_hbm)
    for r0 in range(0, T, ROWS_PER_TILE):
        n = min(ROWS_PER_TILE, T - r0)
        x = nl.ndarray((n, cols), dtype=nl.float32, buffer=nl.sbuf)
        if cols > E:
            nisa.memset(dst=x[:, E:cols], value=float("-inf"))
        nisa.dma_copy(dst=x[:, 0:E], src=logits[r0 : r0 + n, :])
        _topk_tile(weights, ids, r0, x, top_k, renormalize)
    return weights, ids


@nki.jit
def router_topk_matmul(x, gate_weight_t, top_k, renormalize):
    """The gate matmul, softmax, top-k and optional renormalisation: ``router_topk(x @ gate_weight_t, ...)``.

    The logits stay in PSUM in fp32 (never rounded to the activation dtype, as nki-library's router and NxDI's fp32
    router keep them); vLLM's ReplicatedLinear gate rounds them to bf16 on the unfused path, so with bf16
    activations near-tied experts can rank differently from it. With fp32 activations both are fp32.

    Dimensions: T tokens, H hidden size, F = H / 128, E experts, K = top_k.

    Args:    x [T, H] bf16|fp32 HBM; gate_weight_t [H, E] same dtype HBM (the gate weight transposed: the kernel
             layout, so that each partition reads one contiguous F x E run); top_k int; renormalize bool.
    Returns: (weights [T, K] fp32, ids [T, K] int32), best first, nl.shared_hbm.
    Tiling:  gate weight loaded once as [128, F, E] (partition p holds rows h = p*F .. p*F+F-1); T by ROWS_PER_TILE
             tokens: x loaded H-on-partitions [128, n, F] (same h split), Tensor: F matmuls
             logits[n, E] += x[:, :, f]^T @ w[:, f, :] accumulated in one PSUM bank (fp32); then router_topk's
             softmax / max8 / renormalisation read the logits from PSUM (Vector copy to a -inf padded SBUF tile
             when E < 8); two stores.
    Limits:  x 2-D, T >= 1; gate_weight_t [H, E] with x's dtype; H % 128 == 0; 1 <= E <= 512 (one PSUM bank);
             1 <= top_k <= min(8, E); the weight ([128, F*E]) and one x tile fit SBUF.
    """
    where = "router_topk_matmul"
    require(len(x.shape) == 2, where, f"x.shape={tuple(x.shape)}; must be 2-D [T, H]")
    T, H = x.shape
    require(T >= 1, where, f"T={T}; must be >= 1")
    require(
        len(gate_weight_t.shape) == 2 and gate_weight_t.shape[0] == H,
        where,
        f"gate_weight_t.shape={tuple(gate_weight_t.shape)}; must be [H={H}, E]",
    )
    E = gate_weight_t.shape[1]
    require(
        gate_weight_t.dtype == x.dtype,
        where,
        f"gate_weight_t.dtype={gate_weight_t.dtype}; must equal x.dtype={x.dtype} (matmul operands)",
    )
    require(H % PMAX == 0, where, f"H={H}; must be a multiple of {PMAX} (contraction tiles on partitions)")
    require(1 <= E <= MAX_GATE_EXPERTS, where, f"E={E}; must be 1..{MAX_GATE_EXPERTS} (logits in one PSUM bank)")
    require(1 <= top_k <= min(TOPK8, E), where, f"top_k={top_k}; must be 1..min({TOPK8}, E={E}) (max8)")
    F = H // PMAX
    item = getattr(x.dtype, "itemsize", 4)
    per_partition = F * E * item + ROWS_PER_TILE * F * item + 2 * max(E, MIN_COLS) * 4
    require(
        per_partition <= SBUF_PARTITION_BYTES,
        where,
        f"H={H}, E={E} need {per_partition} B of SBUF per partition; must fit {SBUF_PARTITION_BYTES} B",
    )
    cols = max(E, MIN_COLS)
    weights = nl.ndarray((T, top_k), dtype=nl.float32, buffer=nl.shared_hbm)
    ids = nl.ndarray((T, top_k), dtype=nl.int32, buffer=nl.shared_hbm)
    w = nl.ndarray((PMAX, F, E), dtype=gate_weight_t.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=w, src=gate_weight_t.reshape((PMAX, F, E)))
    for r0 in range(0, T, ROWS_PER_TILE):
        n = min(ROWS_PER_TILE, T - r0)
        xt = nl.ndarray((PMAX, n, F), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=xt, src=rows_over_partitions(x, r0, n))
        logits = nl.ndarray((n, E), dtype=nl.float32, buffer=nl.psum)
        for f in range(F):
            nisa.nc_matmul(dst=logits, stationary=xt[:, :, f], moving=w[:, f, :], accumulate=f > 0)
        if cols > E:
            padded = nl.ndarray((n, cols), dtype=nl.float32, buffer=nl.sbuf)
            nisa.memset(dst=padded[:, E:cols], value=float("-inf"))
            nisa.tensor_copy(dst=padded[:, 0:E], src=logits)
            logits = padded
        _topk_tile(weights, ids, r0, logits, top_k, renormalize)
    return weights, ids


def router_topk_ref(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = probs.gather(1, order)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, order.to(torch.int32)


def router_topk_matmul_ref(
    x: torch.Tensor, gate_weight_t: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return router_topk_ref(x.float() @ gate_weight_t.float(), top_k, renormalize)
