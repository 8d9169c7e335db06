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
    Tokens are grouped by expert so each selected expert runs one matmul over its tokens; unselected experts cost
    nothing. Routing weights are cast to the activation dtype before the multiply, as Hugging Face does.
    """
    num_tokens, hidden_size = hidden.shape
    out = torch.zeros_like(hidden)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    token_of_slot = order // topk_ids.shape[1]
    weight_of_slot = topk_weights.reshape(-1)[order].to(hidden.dtype)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        tokens = token_of_slot[start : start + count]
        x = hidden.index_select(0, tokens)
        y = F.linear(silu_mul(F.linear(x, w13[expert])), w2[expert])
        out.index_add_(0, tokens, y * weight_of_slot[start : start + count, None])
        start += count
    return out
