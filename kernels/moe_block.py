"""The decode MoE block in one kernel call: residual add, RMSNorm, router and selected experts (a decode step's
MoE layer as one launch). Weight layout and numerics: ``moe_common``; the experts' part is ``moe_decode``'s."""

import nki
import nki.isa as nisa
import nki.language as nl
import torch

from .limits import GEMM_MOVING_FMAX, TOPK8, TOPK8_MAX_ELEMS, TOPK8_MIN_ELEMS, require
from .moe_common import (
    check_experts,
    experts_model_layout,
    experts_ref,
    load_rows_hp,
    selected_experts,
    store_experts_sum,
    store_rows_hp,
)
from .moe_decode import MAX_DECODE_TOKENS
from .subkernels import softmax_rows
from .views import sbuf_view

# The router's logits tile [T, E] is one matmul's moving free size (nc_matmul: N <= gemm_moving_fmax).
MAX_ROUTER_EXPERTS = GEMM_MOVING_FMAX


@nki.jit
def moe_block_decode(hidden, residual, gamma, router_w, w13, w2, eps, top_k, norm_topk_prob):
    """The decode MoE block in one call: residual add, RMSNorm, router (softmax, top-k, renorm), selected experts.

    Computes r = hidden + residual; x = gamma * rmsnorm(r); probs = softmax(x @ Wr^T) in fp32 (logits rounded to
    hidden's dtype first, as the model's bf16 gate does); the top_k experts (ties: lowest id first) with weights
    renormalised to sum 1 if norm_topk_prob; out = sum_k w_k * expert_k(x). Returns (out, r), the pair vLLM's
    decoder layer carries (r is the next layer's residual).

    Dimensions: T tokens (<= 128), H = HP * KT hidden, E experts, K = top_k, I = IT * IP expert intermediate.

    Args:    hidden, residual [T, H] bf16|fp32 HBM; gamma [H] HBM (hidden's dtype); router_w [HP, KT, E] HBM
             (``router_kernel_layout``); w13 [E, IT, HP, KT, 2*IP], w2 [E, IT, IP, H] HBM (``experts_kernel_layout``);
             eps float; top_k int; norm_topk_prob bool.
    Returns: (out [T, H], r [T, H]), hidden's dtype, in nl.shared_hbm.
    Tiling:  hidden/residual/gamma/router weights to SBUF with H on partitions ([HP, T, KT], one DMA each);
             Vector: r = hidden + residual, r^2 and its sum over kt; Tensor: the sum over partitions, broadcast to all
             of them, as a ones[HP, HP] fp32 matmul; Vector/Scalar: rstd = rsqrt(sum / H + eps), x = (r * rstd)
             rounded, times gamma; Tensor: logits [T, E] = sum over kt of x[:, :, kt] (stationary [HP, T]) against
             router_w[:, kt, :] (moving [HP, E]); Vector/Scalar: max, exp with sum, reciprocal (softmax), max8 +
             nc_find_index8 (top-8), renormalisation; GpSimd + Tensor: the [T, K] weights broadcast to every
             partition ([HP, T*K], by a ones matmul over a diagonal mask built with affine_select); then the
             selected experts as ``moe_decode`` (ids straight from nc_find_index8's SBUF tile as DMA offsets).
    Grid:    ``moe_block_decode[g]`` (LNC=2: g = 2): every program computes the norm and the router (a few us; both
             need the expert ids), then the experts split as ``moe_decode``'s grid (each core reads half the selected
             experts' weights, partial sums exchanged by ``sendrecv``); r and out stored by partition shares.
    Limits:  1 <= T <= 128; 8 <= E <= 512 (max8 reads >= 8 values; logits are one moving tile); 1 <= top_k <= 8
             (max8); hidden, residual, gamma, router_w, w13, w2 share a dtype (bf16 or fp32); shapes as the layouts.
    """
    where = "moe_block_decode"
    T, H, E, HP, KT, IP, IT = check_experts(where, hidden, w13, w2, MAX_DECODE_TOKENS)
    require(
        tuple(residual.shape) == (T, H) and residual.dtype == hidden.dtype,
        where,
        f"residual={tuple(residual.shape)} {residual.dtype}; must be [{T}, {H}] {hidden.dtype}",
    )
    require(
        tuple(gamma.shape) == (H,) and gamma.dtype == hidden.dtype,
        where,
        f"gamma={tuple(gamma.shape)} {gamma.dtype}; must be [{H}] {hidden.dtype}",
    )
    require(
        tuple(router_w.shape) == (HP, KT, E) and router_w.dtype == hidden.dtype,
        where,
        f"router_w={tuple(router_w.shape)} {router_w.dtype}; must be [{HP}, {KT}, {E}] {hidden.dtype} "
        "(router_kernel_layout)",
    )
    require(
        max(TOPK8_MIN_ELEMS, 1) <= E <= min(MAX_ROUTER_EXPERTS, TOPK8_MAX_ELEMS),
        where,
        f"E={E}; must be {TOPK8_MIN_ELEMS}..{MAX_ROUTER_EXPERTS} (max8 input; one moving tile of logits)",
    )
    K = int(top_k)
    require(1 <= K <= TOPK8, where, f"top_k={top_k}; must be 1..{TOPK8} (max8 returns 8 values)")
    out = nl.ndarray((T, H), dtype=hidden.dtype, buffer=nl.shared_hbm)
    r_out = nl.ndarray((T, H), dtype=hidden.dtype, buffer=nl.shared_hbm)
    dt = hidden.dtype

    # residual add (rounded to the activation dtype, as the model's x + residual)
    r_sb = nl.ndarray((HP, T, KT), dtype=dt, buffer=nl.sbuf)
    load_rows_hp(r_sb, hidden, T, H, HP, KT)
    res_sb = nl.ndarray((HP, T, KT), dtype=dt, buffer=nl.sbuf)
    load_rows_hp(res_sb, residual, T, H, HP, KT)
    nisa.tensor_tensor(dst=r_sb, data1=r_sb, data2=res_sb, op=nl.add)
    store_rows_hp(r_out, r_sb, T, H, HP, KT)
    gamma_sb = nl.ndarray((HP, KT), dtype=dt, buffer=nl.sbuf)
    nisa.dma_copy(dst=gamma_sb, src=gamma.ap([[KT, HP], [1, KT]], offset=0))
    # one tile per hidden tile kt, so the router's matmuls start as the weight arrives
    rw_tiles = router_tiles(router_w.reshape((HP, KT * E)), [[KT * E, HP], [1, E]], E, KT, E)

    x_sb = normalise(r_sb, gamma_sb, eps, H, T)
    ids8, w_sb = route(x_sb, rw_tiles, T, K, bool(norm_topk_prob))

    acc = nl.ndarray((HP, T, KT), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=acc, value=0.0)
    selected_experts(acc, x_sb, w13, w2, ids8, True, w_sb, T, K)
    store_experts_sum(out, acc, T, H, HP, KT)
    return out, r_out


def normalise(r_sb, gamma_sb, eps, H: int, T: int):
    """x [P, T, KT] (r_sb's dtype) = gamma * cast(r * rsqrt(mean(r^2) + eps)) per token, for ``r_sb [P, T, KT]`` and
    ``gamma_sb [P, KT]`` in the same split of H over (partition, kt), whichever it is (the sum runs over both).

    Vector: r^2 and its sum over kt; Tensor: the sum over partitions, broadcast to all of them, as a ones[P, P] fp32
    matmul; Vector/Scalar: rstd = rsqrt(sum / H + eps), x = (r * rstd) rounded (Hugging Face's cast point), times
    gamma."""
    P, _, KT = r_sb.shape
    dt = r_sb.dtype
    sq = nl.ndarray((P, T, KT), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=sq, data1=r_sb, data2=r_sb, op=nl.multiply)
    part = nl.ndarray((P, T), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=part, op=nl.add, data=sq, axis=2)
    ones = nl.ndarray((P, P), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    ss_ps = nl.ndarray((P, T), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=ss_ps, stationary=ones, moving=part)
    rstd = nl.ndarray((P, T), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=rstd, data=ss_ps, op0=nl.multiply, operand0=1.0 / H, op1=nl.add, operand1=float(eps))
    nisa.activation(dst=rstd, op=nl.rsqrt, data=rstd)
    x_sb = nl.ndarray((P, T, KT), dtype=dt, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=x_sb, data1=r_sb, data2=sbuf_view(rstd, [[1, T], [0, KT]]), op=nl.multiply)
    nisa.tensor_tensor(dst=x_sb, data1=x_sb, data2=sbuf_view(gamma_sb, [[0, T], [1, KT]]), op=nl.multiply)
    return x_sb


def router_tiles(weight, pattern, step: int, KT: int, E: int):
    """The router weight as KT SBUF tiles [P, E], tile kt at ``pattern`` from element ``kt * step`` of ``weight``
    (HBM): one DMA each, so the router's matmul over tile kt waits for that tile only."""
    tiles = []
    for kt in range(KT):
        tile = nl.ndarray((pattern[0][1], E), dtype=weight.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=tile, src=weight.ap(pattern, offset=kt * step))
        tiles.append(tile)
    return tiles


def route(x_sb, rw_tiles, T: int, K: int, norm_topk_prob: bool):
    """The router on normalised tokens ``x_sb [P, T, KT]`` and its weight ``rw_tiles``, KT tiles [P, E] (the same split
    of H, ``router_tiles``):
    logits [T, E] (fp32 PSUM over kt, rounded to x's dtype as the model's gate), the top K ids from the logits (max8 +
    nc_find_index8: ties take the lowest id first), softmax in fp32 and the top K probabilities, renormalised if
    ``norm_topk_prob``. Returns (ids8 [T, 8] uint32,
    the top K in columns 0..K-1; w_sb [P, T*K] fp32: slot t*K + k's weight on every partition).

    GpSimd + Tensor: the [T, K] weights reach every partition by a ones matmul over a diagonal mask built with
    affine_select."""
    P, _, KT = x_sb.shape
    E = rw_tiles[0].shape[1]
    lg_ps = nl.ndarray((T, E), dtype=nl.float32, buffer=nl.psum)
    for kt in range(KT):
        nisa.nc_matmul(dst=lg_ps, stationary=x_sb[:, :, kt], moving=rw_tiles[kt], accumulate=kt > 0)
    logits = nl.ndarray((T, E), dtype=x_sb.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=logits, src=lg_ps)
    # The ids from the logits: softmax is increasing, so the K largest logits are the K largest probabilities, ties
    # included (equal logits, equal probabilities; lowest id first either way). The expert weights' DMAs wait only
    # for the ids, so they are requested before the softmax is computed.
    top_logits = nl.ndarray((T, TOPK8), dtype=x_sb.dtype, buffer=nl.sbuf)
    nisa.max8(dst=top_logits, src=logits)
    ids8 = nl.ndarray((T, TOPK8), dtype=nl.uint32, buffer=nl.sbuf)
    nisa.nc_find_index8(dst=ids8, data=logits, vals=top_logits)
    probs = nl.ndarray((T, E), dtype=nl.float32, buffer=nl.sbuf)
    softmax_rows(probs, logits, T)  # the router kernel's softmax sub-kernel
    top8 = nl.ndarray((T, TOPK8), dtype=nl.float32, buffer=nl.sbuf)  # the same experts' probabilities, in order
    nisa.max8(dst=top8, src=probs)
    wk = nl.ndarray((T, K), dtype=nl.float32, buffer=nl.sbuf)
    if norm_topk_prob:
        wsum = nl.ndarray((T, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=wsum, op=nl.add, data=top8[:, 0:K], axis=1)
        nisa.reciprocal(dst=wsum, data=wsum)
        nisa.tensor_scalar(dst=wk, data=top8[:, 0:K], op0=nl.multiply, operand0=wsum)
    else:
        nisa.tensor_copy(dst=wk, src=top8[:, 0:K])

    # weights to every partition: diag[t', t, k] = wk[t', k] if t' == t, then ones[T, P]^T @ diag -> [P, T*K]
    diag = nl.ndarray((T, T, K), dtype=nl.float32, buffer=nl.sbuf)
    nisa.affine_select(
        dst=diag,
        pattern=[[-1, T], [0, K]],
        channel_multiplier=1,
        on_true_tile=sbuf_view(wk, [[0, T], [1, K]]),
        on_false_value=0.0,
        cmp_op=nl.equal,
    )
    ones_t = nl.ndarray((T, P), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones_t, value=1.0)
    w_sb = nl.ndarray((P, T * K), dtype=nl.float32, buffer=nl.sbuf)
    diag_flat = diag.reshape((T, T * K))
    for n0 in range(0, T * K, GEMM_MOVING_FMAX):
        n = min(GEMM_MOVING_FMAX, T * K - n0)
        wb_ps = nl.ndarray((P, n), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=wb_ps, stationary=ones_t, moving=diag_flat[:, n0 : n0 + n])
        nisa.tensor_copy(dst=w_sb[:, n0 : n0 + n], src=wb_ps)
    return ids8, w_sb


def moe_block_decode_ref(
    hidden: torch.Tensor,
    residual: torch.Tensor,
    gamma: torch.Tensor,
    router_w: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    eps: float,
    top_k: int,
    norm_topk_prob: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_block_decode`` in plain torch, rounding where the model rounds (r, normed x, x * gamma, logits)."""
    E = router_w.shape[2]
    wr = router_w.permute(2, 0, 1).reshape(E, -1)  # [E, H]
    x, r, weights, ids = norm_route_ref(hidden, residual, gamma, wr, eps, top_k, norm_topk_prob)
    w13m, w2m = experts_model_layout(w13, w2)
    return experts_ref(x, w13m, w2m, weights, ids), r


def norm_route_ref(hidden, residual, gamma, wr, eps: float, top_k: int, norm_topk_prob: bool):
    """The fused blocks' residual add, RMSNorm and router in torch, rounded as the model rounds, for the router
    weight ``wr [E, H]``: (x, r, weights [T, K] fp32, ids [T, K]); ties take the lowest id first (max8 +
    nc_find_index8)."""
    dt = hidden.dtype
    r = hidden + residual
    r32 = r.float()
    normed = (r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)).to(dt)
    x = (gamma * normed).to(dt)
    logits = (x.float() @ wr.float().T).to(dt)
    probs = torch.softmax(logits.float(), dim=-1)
    order = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, ids = order.values[:, :top_k], order.indices[:, :top_k]
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return x, r, weights, ids
