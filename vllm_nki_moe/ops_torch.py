"""The ``torch`` backend of ``vllm_nki_moe.ops``: plain PyTorch, the serving path on CPU and the fallback elsewhere.

Numerics follow Hugging Face's Qwen3-MoE (transformers ``modeling_qwen3_moe``) so greedy tokens match it: norms and
routing in fp32, results cast back to the activation dtype at the same points HF casts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last axis; any leading shape (tokens, or tokens x heads)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` then RMSNorm of the sum; returns (normed, new residual)."""
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps), new_residual


def rope_cos_sin_cache(head_dim: int, max_positions: int, theta: float) -> torch.Tensor:
    """``[max_positions, head_dim]`` fp32: cos in the first half of each row, sin in the second (neox layout).

    Computed as transformers' default rope does (int64 arange cast to fp32, fp32 outer product), so that the angles
    are bit-identical to Hugging Face's.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary embedding (rotate halves) of q ``[T, Hq*D]`` and k ``[T, Hk*D]`` at ``positions [T]``."""
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)  # each [T, D/2]
    cos = torch.cat([cos, cos], dim=-1)[:, None, :]
    sin = torch.cat([sin, sin], dim=-1)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        heads = x.view(x.shape[0], -1, head_dim)
        x1, x2 = heads.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (heads * cos.to(x.dtype) + rotated * sin.to(x.dtype)).view(x.shape)

    return rotate(q), rotate(k)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up [T, 2I]`` holding gate in the first half; returns ``[T, I]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def router_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts in fp32, top-k (ties as torch.topk), optional renormalisation to sum 1.

    Returns (weights ``[T, K]`` fp32, expert ids ``[T, K]`` int64), best first.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts: ``sum_k w_k * down_e(silu(gate_e(x)) * up_e(x))`` for each token's experts ``e``.

    hidden ``[T, H]``; w13 ``[E, 2I, H]`` (gate rows then up rows); w2 ``[E, H, I]``; topk_* ``[T, K]``.
    Token slots are sorted by expert (stably) so each selected expert runs one matmul over a contiguous run of its
    tokens; unselected experts cost nothing. Routing weights are cast to the activation dtype before the multiply, as
    Hugging Face does, and one ``index_add_`` over the expert-sorted slots adds each token's contributions in
    ascending expert order: Hugging Face's summation order, so float32 results match it bit for bit.
    """
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    token_of_slot = order // top_k
    x_sorted = hidden.index_select(0, token_of_slot)
    y_sorted = torch.empty_like(x_sorted)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            end = start + count
            y_sorted[start:end] = F.linear(silu_mul(F.linear(x_sorted[start:end], w13[expert])), w2[expert])
            start = end
    y_sorted.mul_(topk_weights.reshape(-1)[order].to(hidden.dtype)[:, None])
    return torch.zeros_like(hidden).index_add_(0, token_of_slot, y_sorted)


def _write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Rows ``k``/``v`` ``[T, Hk*D]`` into the paged caches ``[NB, Hk, BS, D]`` at ``slot_mapping`` (in place).

    A slot is ``block * BS + offset``; negative slots are padding and are skipped (vLLM's convention).
    """
    _, kv_heads, block_size, head_dim = k_cache.shape
    slots = slot_mapping.long()
    keep = slots >= 0
    blocks, offsets = slots[keep] // block_size, slots[keep] % block_size
    k_cache[blocks, :, offsets, :] = k[keep].reshape(-1, kv_heads, head_dim).to(k_cache.dtype)
    v_cache[blocks, :, offsets, :] = v[keep].reshape(-1, kv_heads, head_dim).to(v_cache.dtype)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """q ``[T, Hq, D]``, keys/values ``[S, Hk, D]`` -> ``[T, Hq*D]``: GQA softmax attention in fp32, as HF's eager
    attention computes it for fp32 models (the softmax is fp32 in HF whatever the activation dtype)."""
    num_tokens, q_heads, head_dim = q.shape
    group = q_heads // keys.shape[1]
    qh = q.float().transpose(0, 1)
    kh = keys.float().transpose(0, 1).repeat_interleave(group, dim=0)
    vh = values.float().transpose(0, 1).repeat_interleave(group, dim=0)
    scores = torch.matmul(qh, kh.transpose(1, 2)) * scale
    if causal:
        mask = torch.ones(num_tokens, keys.shape[0], dtype=torch.bool).tril(keys.shape[0] - num_tokens)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vh).transpose(0, 1).reshape(num_tokens, q_heads * head_dim).to(q.dtype)


def attention_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of one sequence starting at position 0; writes its K/V into the paged cache first.

    q ``[T, Hq*D]``, k/v ``[T, Hk*D]`` (after q/k norm and RoPE); k_cache/v_cache ``[NB, Hk, BS, D]`` (vLLM's HND
    layout), updated in place at ``slot_mapping [T]`` (negative = padding). Returns ``[T, Hq*D]``.
    """
    _write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    head_dim = k_cache.shape[-1]
    num_tokens = q.shape[0]
    return _attend(
        q.reshape(num_tokens, -1, head_dim),
        k.reshape(num_tokens, -1, head_dim),
        v.reshape(num_tokens, -1, head_dim),
        scale,
        causal=True,
    )


def attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One new token per sequence: write its K/V at ``slot_mapping [B]``, then attend over the sequence's cache.

    q ``[B, Hq*D]``, k/v ``[B, Hk*D]``; ``block_tables [B, MB]`` lists each sequence's blocks in position order;
    ``context_lens [B]`` counts its tokens including the new one. Returns ``[B, Hq*D]``.
    """
    _write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    block_size, head_dim = k_cache.shape[2], k_cache.shape[3]
    outs = []
    for b in range(q.shape[0]):
        positions = torch.arange(int(context_lens[b]))
        blocks = block_tables[b].long()[positions // block_size]
        keys = k_cache[blocks, :, positions % block_size, :]  # [L, Hk, D]
        values = v_cache[blocks, :, positions % block_size, :]
        outs.append(_attend(q[b : b + 1].reshape(1, -1, head_dim), keys, values, scale, causal=False))
    return torch.cat(outs)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head q/k RMSNorm then neox RoPE: ``apply_rope(rms_norm(q), rms_norm(k))``, bit for bit.

    q ``[T, Hq*D]``, k ``[T, Hk*D]``; q_weight / k_weight ``[D]``; returns (q, k) in the same shapes.
    """
    num_tokens = q.shape[0]
    q = rms_norm(q.view(num_tokens, -1, head_dim), q_weight, eps).view(q.shape)
    k = rms_norm(k.view(num_tokens, -1, head_dim), k_weight, eps).view(k.shape)
    return apply_rope(q, k, positions, cos_sin_cache, head_dim)
