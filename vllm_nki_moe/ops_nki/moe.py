"""``moe_experts`` through ``kernels/moe_decode.py`` (few tokens) or ``kernels/moe_prefill.py`` (many tokens).

The model keeps its weights as vLLM loads them (``w13 [E, 2I, H]``, ``w2 [E, H, I]``); the kernels want the kernel
layout of ``moe_decode`` (H and I split into partition tiles, one contiguous run per partition per DMA). The wrapper
converts each weight tensor once and caches the result (``bridge.KernelWeights``): converting per call would move the
whole expert tensor, hundreds of MB at Qwen3-30B-A3B sizes, every layer of every step. The better fix, proposed to
the model's owner: load the experts straight into the kernel layout (the conversion is a fixed permutation of each
checkpoint tensor, ``experts_kernel_layout``) so no second copy exists.

Choice of kernel (trn2 cost model, Qwen3-30B-A3B TP=4, E=128, K=8; figures from
``python -m vllm_nki_moe.kernel_check.cases_moe --select``): the decode kernel reads T*K experts, one per
(token, slot); the prefill kernel reads each used expert once but pays per-block gathers and scatters. Estimates
(decode vs prefill with 8-token blocks): T=1 53.5 vs 56.7 us, T=2 106.8 vs 106.3, T=4 213.4 vs 205.4, T=8 426.6
vs 361.2. So decode runs for one token (its K experts are distinct: nothing to share) and while T*K <= E/16,
prefill above, with the block size ``routed_block_size`` picks from the routing (least weight + padding traffic).
"""

from __future__ import annotations

import torch

from nki_emulator import install

install()  # `import nki` in the kernels: the emulator unless the real package imports (then a no-op)

from ..kernels import moe_decode, moe_prefill  # noqa: E402 - after install()
from ..kernels.limits import PMAX  # noqa: E402 - after install()
from .bridge import KernelOp, KernelWeights, call_kernel  # noqa: E402 - after install()

DECODE_SLOTS_PER_EXPERT = 1 / 16  # decode while T*K <= E * this, or T == 1 (see module docstring)
DTYPES = (torch.bfloat16, torch.float32)


_weights = KernelWeights()


def use_decode(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether ``moe_experts`` runs the decode kernel (else prefill) for these sizes (module docstring)."""
    if num_tokens > moe_decode.MAX_DECODE_TOKENS:
        return False
    return num_tokens == 1 or num_tokens * top_k <= num_experts * DECODE_SLOTS_PER_EXPERT


PREFILL_BLOCK_STEP = 8  # block sizes a multiple of this: at most PMAX / 8 = 16 kernel shapes per token count


def routed_block_size(topk_ids: torch.Tensor, num_experts: int, intermediate: int) -> int:
    """Block size in [PREFILL_BLOCK_STEP, PMAX], a multiple of PREFILL_BLOCK_STEP, for this routing (host counts).

    Each used block reads its expert's weights (3 * H * I elements) and gathers, then scatter-adds (read-modify-write),
    B token rows, padding included (3 * B * H elements): the HBM traffic is proportional to
    ``sum_e ceil(count_e / B) * (I + B)``, minimised here (ties: the smaller B). Usually B = the busiest expert's
    count rounded up, so every expert's weights are read once and padding is the least. Cost model, kernel-check
    routing, vs the earlier rule (a power of two >= twice the mean tokens per expert): TP=4 T=131 B=16 vs 32: 943 vs
    1012 us; T=256 24 vs 32: 986 vs 1013; T=512 40 vs 64: 1084 vs 1155; TP=8 T=512 40 vs 64: 649 vs 734.
    """
    counts = torch.bincount(topk_ids.reshape(-1).long(), minlength=num_experts)
    counts = counts[counts > 0]
    best, best_cost = PMAX, None
    for b in range(PREFILL_BLOCK_STEP, PMAX + 1, PREFILL_BLOCK_STEP):
        cost = int(((counts + b - 1) // b).sum()) * (intermediate + b)
        if best_cost is None or cost < best_cost:
            best, best_cost = b, cost
    return best


def _supports(hidden, w13, w2, topk_weights, topk_ids) -> str | None:
    if hidden.dtype not in DTYPES:
        return f"hidden.dtype={hidden.dtype}; the kernels take bfloat16 or float32"
    if w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        return f"w13.dtype={w13.dtype}, w2.dtype={w2.dtype}; must equal hidden.dtype={hidden.dtype}"
    if hidden.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        return f"hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}; must be 2-D, 3-D, 3-D"
    H = hidden.shape[1]
    E, I2, _ = w13.shape
    for what, n in (("H", H), ("I", I2 // 2)):
        tiles = -(-n // PMAX)
        if n % tiles:
            return f"{what}={n}; must split into ceil({what}/{PMAX})={tiles} equal partition tiles"
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        return f"topk_ids.shape={tuple(topk_ids.shape)}; must be [T={hidden.shape[0]}, K]"
    return None


def _moe_experts(backend: str, hidden, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    T = hidden.shape[0]
    if T == 0:
        return torch.zeros_like(hidden)
    E, K = w13.shape[0], topk_ids.shape[1]
    w13k, w2k = _weights.get(moe_decode.experts_kernel_layout, w13, w2)
    x = hidden.contiguous()
    weights = topk_weights.float().contiguous()
    if use_decode(T, K, E):
        ids = topk_ids.to(torch.int32).contiguous()
        return call_kernel(backend, moe_decode.moe_decode, x, w13k, w2k, weights, ids)
    block = routed_block_size(topk_ids, E, w13.shape[1] // 2)
    meta = moe_prefill.prefill_block_metadata(topk_ids, weights, E, block)
    return call_kernel(backend, moe_prefill.moe_prefill, x, w13k, w2k, *meta)


MAX8_MIN_EXPERTS, MAX8_MAX_EXPERTS, MAX8_MAX_K = 8, 512, 8  # moe_block_decode's Limits (max8 reads 8..; one tile)


def fused_block_applies(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether ``moe_block`` runs the fused decode kernel at these sizes (else the ops in sequence)."""
    return (
        use_decode(num_tokens, top_k, num_experts)
        and MAX8_MIN_EXPERTS <= num_experts <= MAX8_MAX_EXPERTS
        and top_k <= MAX8_MAX_K
    )


def _block_supports(hidden, residual, norm_weight, eps, gate_weight, w13, w2, top_k, renormalize) -> str | None:
    """Where the fused decode block applies; elsewhere ``moe_block`` runs as separate ops (not an error)."""
    T, E = hidden.shape[0], w13.shape[0]
    if not fused_block_applies(T, top_k, E):
        return (
            f"T={T}, E={E}, top_k={top_k}; the fused block is a decode kernel (T=1 or T*top_k <= E/16) with "
            f"{MAX8_MIN_EXPERTS} <= E <= {MAX8_MAX_EXPERTS} and top_k <= {MAX8_MAX_K}"
        )
    if residual.dtype != hidden.dtype or norm_weight.dtype != hidden.dtype or gate_weight.dtype != hidden.dtype:
        return f"dtypes {residual.dtype}, {norm_weight.dtype}, {gate_weight.dtype}; must equal hidden's {hidden.dtype}"
    ids = torch.zeros(T, top_k, dtype=torch.int32)
    return _supports(hidden, w13, w2, ids.float(), ids)


def _moe_block(backend: str, hidden, residual, norm_weight, eps, gate_weight, w13, w2, top_k, renormalize):
    w13k, w2k = _weights.get(moe_decode.experts_kernel_layout, w13, w2)
    router_w = _weights.get(moe_decode.router_kernel_layout, gate_weight)
    return call_kernel(
        backend,
        moe_decode.moe_block_decode,
        hidden.contiguous(),
        residual.contiguous(),
        norm_weight.contiguous(),
        router_w,
        w13k,
        w2k,
        float(eps),
        int(top_k),
        bool(renormalize),
    )


def kernel_ops() -> list[KernelOp]:
    return [
        KernelOp(name="moe_experts", run=_moe_experts, supports=_supports),
        KernelOp(name="moe_block", run=_moe_block, supports=_block_supports, composite=True),
    ]
