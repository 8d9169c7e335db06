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

from .limits import PMAX, TOPK8, TOPK8_MAX_ELEMS, TOPK8_MIN_ELEMS, require

ROWS_PER_TILE = PMAX  # one token per partition, all experts in the free axis
# max8 / nc_find_index8 read at least 8 elements per partition: fewer experts are padded with -inf logits
# (probability 0, and a higher index than every real expert, so they are never preferred in a tie).
MIN_COLS = TOPK8_MIN_ELEMS


def _check_router_args(where: str, logits, top_k: int) -> None:
    require(len(logits.shape) == 2, where, f"logits.shape={tuple(logits.shape)}; must be 2-D [T, E]")
    T, E = logits.shape
    require(T >= 1, where, f"T={T}; must be >= 1")
    require(1 <= E <= TOPK8_MAX_ELEMS, where, f"E={E}; must be 1..{TOPK8_MAX_ELEMS} (max8 elements per partition)")
    require(1 <= top_k <= TOPK8, where, f"top_k={top_k}; must be 1..{TOPK8} (max8 returns 8 values)")
    require(top_k <= E, where, f"top_k={top_k}; must not exceed E={E}")


def _softmax_tile(probs, x, n: int) -> None:
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
        probs = nl.ndarray((n, cols), dtype=nl.float32, buffer=nl.sbuf)
        _softmax_tile(probs, x, n)
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
    return weights, ids


def router_topk_ref(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits.float(), dim=-1)
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = probs.gather(1, order)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, order.to(torch.int32)
