"""Routed SwiGLU experts for decode (few tokens): read only the selected experts' weights, and the fused MoE block.

At batch 1 a Qwen3-MoE layer uses 8 of its experts, so the experts' weight bytes decide the time: the kernels here
fetch exactly the selected experts (runtime expert ids become dynamic DMA offsets) and stream them through the
Tensor Engine once. ``moe_block_decode`` adds the residual, the RMSNorm and the router in the same kernel call, so a
decode step's MoE layer is one launch.

Weight layout (the "kernel layout", produced on the host by ``experts_kernel_layout`` and shared with
``moe_prefill``). Hidden is split as ``h = p * KT + kt`` (``p`` < HP partitions, ``kt`` < KT tiles; HP * KT = H, HP <=
128), the partition-major split nki-library's decode RMSNorm also emits, so a token's row loads with one contiguous
run of KT elements per partition. The expert intermediate is split into IT equal chunks of IP rows
(``i = c * IP + q``):

- ``w13 [E, IT, HP, KT, 2 * IP]``: ``w13[e, c, p, kt, g * IP + q] = W13[e, g * I + c * IP + q, p * KT + kt]`` for the
  model's ``W13 [E, 2I, H]`` (gate rows ``g = 0``, then up rows ``g = 1``). One (expert, chunk) is one DMA with
  KT * 2 * IP contiguous elements per partition (6 KiB at Qwen3-30B-A3B TP=4, 8 KiB at TP=1).
- ``w2 [E, IT, IP, H]``: ``w2[e, c, q, kt * HP + p] = W2[e, p * KT + kt, c * IP + q]`` for the model's
  ``W2 [E, H, I]``: the down projection transposed (I on partitions, for the contraction) with its output columns
  ordered kt-major, so the columns of output tile kt are contiguous. One (expert, chunk) is one DMA of H contiguous
  elements per partition (4 KiB at H = 2048).
- ``router_w [HP, KT, E]`` (``moe_block_decode``): ``router_w[p, kt, e] = Wr[e, p * KT + kt]`` for the model's gate
  weight ``Wr [E, H]``: 4 KiB contiguous per partition at Qwen3-30B-A3B sizes.

Numerics: gate/up and down accumulate in fp32 PSUM; ``silu(gate) * up`` is computed in fp32 and rounded once to the
weights' dtype (the down matmul's input dtype); each expert's output is scaled by its routing weight and summed over
the K experts in fp32, and the sum is rounded once to the output dtype. Hugging Face rounds to bf16 after every step
instead, hence the bf16 tolerance (``bfloat16_matmul``); with float32 inputs every step is fp32.
"""

import nki
import nki.isa as nisa
import nki.language as nl
import torch

from .limits import GEMM_MOVING_FMAX, PMAX, TOPK8, TOPK8_MAX_ELEMS, TOPK8_MIN_ELEMS, require
from .router import _softmax_tile

# Decode handles at most one partition-tile of tokens: the fused block's router puts tokens on partitions.
MAX_DECODE_TOKENS = PMAX
# The router's logits tile [T, E] is one matmul's moving free size (nc_matmul: N <= gemm_moving_fmax).
MAX_ROUTER_EXPERTS = GEMM_MOVING_FMAX
DTYPES = (nl.bfloat16, nl.float32)  # bf16 on hardware; fp32 for the float32 test models


# ----- host-side layout -----------------------------------------------------------------------------------------
def split_tiles(n: int, where: str, what: str) -> tuple[int, int]:
    """``(rows, tiles)``: ``tiles = ceil(n / PMAX)`` equal tiles of ``rows = n / tiles <= PMAX``; raises if uneven."""
    require(n >= 1, where, f"{what}={n}; must be >= 1")
    tiles = -(-n // PMAX)
    require(
        n % tiles == 0,
        where,
        f"{what}={n}; must split into ceil({what}/{PMAX})={tiles} equal partition tiles (a multiple of {tiles})",
    )
    return n // tiles, tiles


def experts_kernel_layout(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` in the kernel layout (module docstring); new tensors."""
    E, I2, H = w13.shape
    require(I2 % 2 == 0, "experts_kernel_layout", f"w13.shape[1]={I2}; must be 2 * I (gate rows then up rows)")
    inter = I2 // 2
    require(
        tuple(w2.shape) == (E, H, inter),
        "experts_kernel_layout",
        f"w2.shape={tuple(w2.shape)}; must be {(E, H, inter)}",
    )
    HP, KT = split_tiles(H, "experts_kernel_layout", "H")
    IP, IT = split_tiles(inter, "experts_kernel_layout", "I")
    # W13[e, g*I + c*IP + q, p*KT + kt] -> [e, c, p, kt, g, q]
    w13k = w13.reshape(E, 2, IT, IP, HP, KT).permute(0, 2, 4, 5, 1, 3).reshape(E, IT, HP, KT, 2 * IP)
    # W2[e, p*KT + kt, c*IP + q] -> [e, c, q, kt, p]
    w2k = w2.reshape(E, HP, KT, IT, IP).permute(0, 3, 4, 2, 1).reshape(E, IT, IP, H)
    return w13k.contiguous(), w2k.contiguous()


def experts_model_layout(w13k: torch.Tensor, w2k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``experts_kernel_layout``: back to ``w13 [E, 2I, H]``, ``w2 [E, H, I]``."""
    E, IT, HP, KT, IP2 = w13k.shape
    IP = IP2 // 2
    H, inter = HP * KT, IT * IP
    w13 = w13k.reshape(E, IT, HP, KT, 2, IP).permute(0, 4, 1, 5, 2, 3).reshape(E, 2 * inter, H)
    w2 = w2k.reshape(E, IT, IP, KT, HP).permute(0, 4, 3, 1, 2).reshape(E, H, inter)
    return w13.contiguous(), w2.contiguous()


def router_kernel_layout(router_w: torch.Tensor) -> torch.Tensor:
    """The model's router (gate) weight ``[E, H]`` as ``[HP, KT, E]`` (module docstring); a new tensor."""
    E, H = router_w.shape
    HP, KT = split_tiles(H, "router_kernel_layout", "H")
    return router_w.reshape(E, HP, KT).permute(1, 2, 0).contiguous()


# ----- argument checks --------------------------------------------------------------------------------------------
def _check_experts(where: str, hidden, w13, w2, T_max: int) -> tuple[int, int, int, int, int, int, int]:
    """Validate hidden/w13/w2 against each other; returns (T, H, E, HP, KT, IP, IT)."""
    require(len(hidden.shape) == 2, where, f"hidden.shape={tuple(hidden.shape)}; must be [T, H]")
    T, H = hidden.shape
    require(1 <= T <= T_max, where, f"T={T}; must be 1..{T_max}")
    require(hidden.dtype in DTYPES, where, f"hidden.dtype={hidden.dtype}; must be bfloat16 or float32")
    require(len(w13.shape) == 5, where, f"w13.shape={tuple(w13.shape)}; must be [E, IT, HP, KT, 2*IP] (kernel layout)")
    E, IT, HP, KT, IP2 = w13.shape
    IP = IP2 // 2
    require(
        HP * KT == H and HP <= PMAX,
        where,
        f"w13.shape={tuple(w13.shape)}; HP*KT must equal H={H} with HP <= {PMAX} (experts_kernel_layout)",
    )
    require(
        IP2 % 2 == 0 and 1 <= IP <= PMAX,
        where,
        f"w13.shape[4]={IP2}; must be 2*IP with IP <= {PMAX} (experts_kernel_layout)",
    )
    require(
        tuple(w2.shape) == (E, IT, IP, H),
        where,
        f"w2.shape={tuple(w2.shape)}; must be {(E, IT, IP, H)} (experts_kernel_layout)",
    )
    require(
        w13.dtype == hidden.dtype and w2.dtype == hidden.dtype,
        where,
        f"w13.dtype={w13.dtype}, w2.dtype={w2.dtype}; must equal hidden.dtype={hidden.dtype} (matmul operands)",
    )
    return T, H, E, HP, KT, IP, IT


# ----- sub-kernels ------------------------------------------------------------------------------------------------
def _load_rows_hp(dst, src, T: int, H: int, HP: int, KT: int) -> None:
    """dst [HP, T, KT] = src [T, H] with h = p * KT + kt: KT contiguous elements per partition and token."""
    nisa.dma_copy(dst=dst, src=src.ap([[KT, HP], [H, T], [1, KT]], offset=0))


def _store_rows_hp(dst, src, T: int, H: int, HP: int, KT: int) -> None:
    """dst [T, H] (HBM) = src [HP, T, KT] (SBUF), the inverse of ``_load_rows_hp``."""
    nisa.dma_copy(dst=dst.ap([[KT, HP], [H, T], [1, KT]], offset=0), src=src)


def _selected_experts(acc, x_sb, w13, w2, ids_sb, ids_token_rows: bool, w_sb, T: int, K: int) -> None:
    """acc[:, t, :] += sum_k weight(t, k) * expert_{id(t, k)}(x[t]), for every token t and slot k.

    acc [HP, T, KT] fp32 SBUF (h = p * KT + kt); x_sb [HP, T, KT] SBUF, weights' dtype; ids_sb int SBUF, either
    [1, T*K] (slot s = t * K + k in column s) or, with ``ids_token_rows``, [T, >= K] (token t on partition t);
    w_sb [HP, T*K] fp32 SBUF, slot s's routing weight on every partition of column s.

    Per slot and intermediate chunk c: one DMA of the expert's gate/up chunk and one of its down chunk (runtime
    offset = expert id); Tensor: 2 * KT gate/up matmuls (weights stationary [HP, IP], the token moving [HP, 1],
    fp32 PSUM accumulation over kt), then KT down matmuls (weights stationary [IP, HP], h moving [IP, 1]) accumulating
    over c into y [HP, KT]; Scalar: silu; Vector: silu * up (rounded to the weights' dtype), then acc += weight * y.
    """
    _, IT, HP, KT, IP2 = w13.shape
    IP = IP2 // 2
    H = HP * KT
    chunk13 = HP * KT * IP2  # elements of one (expert, chunk) of w13
    for t in range(T):
        for k in range(K):
            s = t * K + k
            eid = ids_sb[t : t + 1, k : k + 1] if ids_token_rows else ids_sb[0:1, s : s + 1]
            y_ps = nl.ndarray((HP, KT), dtype=nl.float32, buffer=nl.psum)
            for c in range(IT):
                w13_sb = nl.ndarray((HP, KT, IP2), dtype=w13.dtype, buffer=nl.sbuf)
                nisa.dma_copy(
                    dst=w13_sb,
                    src=w13.ap([[KT * IP2, HP], [IP2, KT], [1, IP2]], offset=c * chunk13, scalar_offset=eid),
                )
                w2_sb = nl.ndarray((IP, H), dtype=w2.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=w2_sb, src=w2.ap([[H, IP], [1, H]], offset=c * IP * H, scalar_offset=eid))
                gu_ps = nl.ndarray((IP, 2), dtype=nl.float32, buffer=nl.psum)  # column 0 gate, 1 up
                for g in range(2):
                    for kt in range(KT):
                        nisa.nc_matmul(
                            dst=gu_ps[:, g : g + 1],
                            stationary=w13_sb[:, kt, g * IP : (g + 1) * IP],
                            moving=x_sb[:, t, kt : kt + 1],
                            accumulate=kt > 0,
                        )
                gate = nl.ndarray((IP, 1), dtype=nl.float32, buffer=nl.sbuf)
                nisa.activation(dst=gate, op=nl.silu, data=gu_ps[:, 0:1])
                h_sb = nl.ndarray((IP, 1), dtype=w2.dtype, buffer=nl.sbuf)
                nisa.tensor_tensor(dst=h_sb, data1=gate, data2=gu_ps[:, 1:2], op=nl.multiply)
                for kt in range(KT):
                    nisa.nc_matmul(
                        dst=y_ps[:, kt : kt + 1],
                        stationary=w2_sb[:, kt * HP : (kt + 1) * HP],
                        moving=h_sb,
                        accumulate=c > 0,
                    )
            nisa.scalar_tensor_tensor(
                dst=acc[:, t, :],
                data=y_ps,
                op0=nl.multiply,
                operand0=w_sb[:, s : s + 1],
                op1=nl.add,
                operand1=acc[:, t, :],
            )


def _finish(out, acc, T: int, H: int, HP: int, KT: int) -> None:
    """out [T, H] (HBM) = acc [HP, T, KT] fp32, rounded once to out's dtype."""
    o_sb = nl.ndarray((HP, T, KT), dtype=out.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=o_sb, src=acc)
    _store_rows_hp(out, o_sb, T, H, HP, KT)


# ----- kernels ----------------------------------------------------------------------------------------------------
@nki.jit
def moe_decode(hidden, w13, w2, topk_weights, topk_ids):
    """Routed experts for a few tokens, reading only the selected experts: out[t] = sum_k w[t,k] * expert(x[t]).

    Dimensions: T tokens (<= 128), H hidden = HP * KT, E experts, K experts per token, I expert intermediate per
    rank = IT * IP (the kernel layout's tiles, module docstring).

    Args:    hidden [T, H] bf16|fp32 HBM; w13 [E, IT, HP, KT, 2*IP] and w2 [E, IT, IP, H] HBM, hidden's dtype, in the
             kernel layout (``experts_kernel_layout``); topk_weights [T, K] fp32 HBM; topk_ids [T, K] int32 HBM.
    Returns: [T, H] hidden's dtype in nl.shared_hbm.
    Tiling:  tokens to SBUF as [HP, T, KT] (one DMA), ids as [1, T*K] and weights broadcast to [HP, T*K] (one DMA
             each); then for each (token, slot) and intermediate chunk: DMA the expert's w13 chunk [HP, KT, 2*IP]
             and w2 chunk [IP, H] at the runtime offset of its id (2 * IT DMAs per slot, >= 4 KiB contiguous per
             partition at Qwen3-30B-A3B sizes), Tensor Engine gate/up and down GEMVs with fp32 PSUM accumulation,
             Scalar silu, Vector silu*up and the weighted fp32 sum in SBUF [HP, T, KT]; one cast and one store.
             Weight bytes read = T * K experts' weights, the minimum when each token's experts are distinct.
    Limits:  1 <= T <= 128; hidden, w13 and w2 share a dtype (bf16 or fp32); shapes as the kernel layout;
             topk_weights [T, K] float32 and topk_ids [T, K] int32 with ids in [0, E) (an id out of range fails the
             DMA, oob_mode=error).
    """
    where = "moe_decode"
    T, H, E, HP, KT, IP, IT = _check_experts(where, hidden, w13, w2, MAX_DECODE_TOKENS)
    require(
        len(topk_ids.shape) == 2 and topk_ids.shape[0] == T,
        where,
        f"topk_ids.shape={tuple(topk_ids.shape)}; must be [T={T}, K]",
    )
    K = topk_ids.shape[1]
    require(K >= 1, where, f"K={K}; must be >= 1")
    require(topk_ids.dtype == nl.int32, where, f"topk_ids.dtype={topk_ids.dtype}; must be int32")
    require(
        tuple(topk_weights.shape) == (T, K) and topk_weights.dtype == nl.float32,
        where,
        f"topk_weights={tuple(topk_weights.shape)} {topk_weights.dtype}; must be [{T}, {K}] float32",
    )
    out = nl.ndarray((T, H), dtype=hidden.dtype, buffer=nl.shared_hbm)

    x_sb = nl.ndarray((HP, T, KT), dtype=hidden.dtype, buffer=nl.sbuf)
    _load_rows_hp(x_sb, hidden, T, H, HP, KT)
    ids_sb = nl.ndarray((1, T * K), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=ids_sb, src=topk_ids.ap([[T * K, 1], [1, T * K]], offset=0))
    w_sb = nl.ndarray((HP, T * K), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=w_sb, src=topk_weights.ap([[0, HP], [1, T * K]], offset=0))  # broadcast to all partitions
    acc = nl.ndarray((HP, T, KT), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=acc, value=0.0)

    _selected_experts(acc, x_sb, w13, w2, ids_sb, False, w_sb, T, K)
    _finish(out, acc, T, H, HP, KT)
    return out


def moe_decode_ref(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """``moe_decode`` in plain fp32 torch; h = silu(gate) * up is rounded to the weights' dtype as in the kernel."""
    w13m, w2m = experts_model_layout(w13, w2)
    return _experts_ref(hidden, w13m, w2m, topk_weights, topk_ids)


def _experts_ref(hidden, w13m, w2m, topk_weights, topk_ids) -> torch.Tensor:
    T, K = topk_ids.shape
    tokens = torch.arange(T)[:, None].expand(T, K).reshape(-1)
    return _slots_ref(hidden, w13m, w2m, tokens, topk_ids.reshape(-1).long(), topk_weights.reshape(-1))


def _slots_ref(hidden, w13m, w2m, tokens, experts, weights) -> torch.Tensor:
    """out[tokens[j]] += weights[j] * expert_{experts[j]}(hidden[tokens[j]]) in fp32, h rounded to w2's dtype."""
    x = hidden.float()
    out = torch.zeros_like(x)
    inter = w13m.shape[1] // 2
    for e in torch.unique(experts).tolist():
        sel = experts == e
        tok = tokens[sel]
        gu = x[tok] @ w13m[e].float().T
        h = (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]).to(w2m.dtype).float()
        out.index_add_(0, tok, (h @ w2m[e].float().T) * weights[sel].float()[:, None])
    return out.to(hidden.dtype)


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
    Limits:  1 <= T <= 128; 8 <= E <= 512 (max8 reads >= 8 values; logits are one moving tile); 1 <= top_k <= 8
             (max8); hidden, residual, gamma, router_w, w13, w2 share a dtype (bf16 or fp32); shapes as the layouts.
    """
    where = "moe_block_decode"
    T, H, E, HP, KT, IP, IT = _check_experts(where, hidden, w13, w2, MAX_DECODE_TOKENS)
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
    _load_rows_hp(r_sb, hidden, T, H, HP, KT)
    res_sb = nl.ndarray((HP, T, KT), dtype=dt, buffer=nl.sbuf)
    _load_rows_hp(res_sb, residual, T, H, HP, KT)
    nisa.tensor_tensor(dst=r_sb, data1=r_sb, data2=res_sb, op=nl.add)
    _store_rows_hp(r_out, r_sb, T, H, HP, KT)
    gamma_sb = nl.ndarray((HP, KT), dtype=dt, buffer=nl.sbuf)
    nisa.dma_copy(dst=gamma_sb, src=gamma.ap([[KT, HP], [1, KT]], offset=0))
    rw_sb = nl.ndarray((HP, KT, E), dtype=dt, buffer=nl.sbuf)
    nisa.dma_copy(dst=rw_sb, src=router_w)

    # RMSNorm: sum of squares over kt (Vector), over partitions (ones matmul, result on every partition)
    sq = nl.ndarray((HP, T, KT), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=sq, data1=r_sb, data2=r_sb, op=nl.multiply)
    part = nl.ndarray((HP, T), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=part, op=nl.add, data=sq, axis=2)
    ones = nl.ndarray((HP, HP), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    ss_ps = nl.ndarray((HP, T), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=ss_ps, stationary=ones, moving=part)
    rstd = nl.ndarray((HP, T), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=rstd, data=ss_ps, op0=nl.multiply, operand0=1.0 / H, op1=nl.add, operand1=float(eps))
    nisa.activation(dst=rstd, op=nl.rsqrt, data=rstd)
    x_sb = nl.ndarray((HP, T, KT), dtype=dt, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=x_sb, data1=r_sb, data2=rstd.expand_dim(2).broadcast(2, KT), op=nl.multiply)
    nisa.tensor_tensor(dst=x_sb, data1=x_sb, data2=gamma_sb.expand_dim(1).broadcast(1, T), op=nl.multiply)

    # router logits [T, E], rounded to the activation dtype, then softmax in fp32
    lg_ps = nl.ndarray((T, E), dtype=nl.float32, buffer=nl.psum)
    for kt in range(KT):
        nisa.nc_matmul(dst=lg_ps, stationary=x_sb[:, :, kt], moving=rw_sb[:, kt, :], accumulate=kt > 0)
    logits = nl.ndarray((T, E), dtype=dt, buffer=nl.sbuf)
    nisa.tensor_copy(dst=logits, src=lg_ps)
    probs = nl.ndarray((T, E), dtype=nl.float32, buffer=nl.sbuf)
    _softmax_tile(probs, logits, T)  # the router kernel's softmax sub-kernel

    # top-k (max8 + nc_find_index8: ties take the lowest id first) and the routing weights [T, K]
    top8 = nl.ndarray((T, TOPK8), dtype=nl.float32, buffer=nl.sbuf)
    nisa.max8(dst=top8, src=probs)
    ids8 = nl.ndarray((T, TOPK8), dtype=nl.uint32, buffer=nl.sbuf)
    nisa.nc_find_index8(dst=ids8, data=probs, vals=top8)
    wk = nl.ndarray((T, K), dtype=nl.float32, buffer=nl.sbuf)
    if norm_topk_prob:
        wsum = nl.ndarray((T, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=wsum, op=nl.add, data=top8[:, 0:K], axis=1)
        nisa.reciprocal(dst=wsum, data=wsum)
        nisa.tensor_scalar(dst=wk, data=top8[:, 0:K], op0=nl.multiply, operand0=wsum)
    else:
        nisa.tensor_copy(dst=wk, src=top8[:, 0:K])

    # weights to every partition: diag[t', t, k] = wk[t', k] if t' == t, then ones[T, HP]^T @ diag -> [HP, T*K]
    diag = nl.ndarray((T, T, K), dtype=nl.float32, buffer=nl.sbuf)
    nisa.affine_select(
        dst=diag,
        pattern=[[-1, T], [0, K]],
        channel_multiplier=1,
        on_true_tile=wk.expand_dim(1).broadcast(1, T),
        on_false_value=0.0,
        cmp_op=nl.equal,
    )
    ones_t = nl.ndarray((T, HP), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones_t, value=1.0)
    w_sb = nl.ndarray((HP, T * K), dtype=nl.float32, buffer=nl.sbuf)
    diag_flat = diag.reshape((T, T * K))
    for n0 in range(0, T * K, GEMM_MOVING_FMAX):
        n = min(GEMM_MOVING_FMAX, T * K - n0)
        wb_ps = nl.ndarray((HP, n), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=wb_ps, stationary=ones_t, moving=diag_flat[:, n0 : n0 + n])
        nisa.tensor_copy(dst=w_sb[:, n0 : n0 + n], src=wb_ps)

    acc = nl.ndarray((HP, T, KT), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=acc, value=0.0)
    _selected_experts(acc, x_sb, w13, w2, ids8, True, w_sb, T, K)
    _finish(out, acc, T, H, HP, KT)
    return out, r_out


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
    dt = hidden.dtype
    r = hidden + residual
    r32 = r.float()
    normed = (r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)).to(dt)
    x = (gamma * normed).to(dt)
    E = router_w.shape[2]
    wr = router_w.permute(2, 0, 1).reshape(E, -1)  # [E, H]
    logits = (x.float() @ wr.float().T).to(dt)
    probs = torch.softmax(logits.float(), dim=-1)
    order = torch.sort(probs, dim=-1, descending=True, stable=True)  # ties: lowest id first, as max8/find_index8
    weights, ids = order.values[:, :top_k], order.indices[:, :top_k]
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    w13m, w2m = experts_model_layout(w13, w2)
    return _experts_ref(x, w13m, w2m, weights, ids), r
