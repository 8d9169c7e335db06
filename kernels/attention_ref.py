"""The one PyTorch reference of paged attention, shared by the attention kernels' ``_ref`` functions and the
``ops.attention`` ops (imports no ``nki``, so the torch backend uses it without the emulator).

Layouts: q ``[T, Hq*D]``, k/v ``[T, Hk*D]``; paged caches ``[NB, Hk, BS, D]`` (vLLM's HND); a slot is
``block * BS + offset`` and negative slots are padding (vLLM's convention). Math in fp32 with the softmax in fp32, as
Hugging Face's eager attention computes it for fp32 models (the softmax is fp32 in HF whatever the activation dtype).
"""

from __future__ import annotations

import torch


def write_kv_cache_(k_cache, v_cache, k, v, slot_mapping) -> None:
    """Rows ``k``/``v`` ``[T, Hk*D]`` into the caches at ``slot_mapping [T]``, in place (negative slots skipped)."""
    _, kv_heads, block_size, head_dim = k_cache.shape
    slots = slot_mapping.long()
    keep = slots >= 0
    blocks, offsets = slots[keep] // block_size, slots[keep] % block_size
    k_cache[blocks, :, offsets, :] = k[keep].reshape(-1, kv_heads, head_dim).to(k_cache.dtype)
    v_cache[blocks, :, offsets, :] = v[keep].reshape(-1, kv_heads, head_dim).to(v_cache.dtype)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """q ``[T, Hq, D]``, keys/values ``[S, Hk, D]`` -> ``[T, Hq*D]`` in q's dtype: GQA softmax attention in fp32;
    ``causal``: query ``t`` sees keys up to ``S - T + t``."""
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


def attend_prefill(q, k, v, head_dim: int, scale: float) -> torch.Tensor:
    """Causal attention of one sequence starting at position 0 over its own k/v: ``[T, Hq*D]``."""
    num_tokens = q.shape[0]
    return attend(
        q.reshape(num_tokens, -1, head_dim),
        k.reshape(num_tokens, -1, head_dim),
        v.reshape(num_tokens, -1, head_dim),
        scale,
        causal=True,
    )


def attend_decode(q, k_cache, v_cache, block_tables, context_lens, scale: float) -> torch.Tensor:
    """One query token per sequence over its ``context_lens[b]`` cached tokens (blocks in ``block_tables[b]``)."""
    block_size, head_dim = k_cache.shape[2], k_cache.shape[3]
    outs = []
    for b in range(q.shape[0]):
        positions = torch.arange(int(context_lens[b]))
        blocks = block_tables[b].long()[positions // block_size]
        keys = k_cache[blocks, :, positions % block_size, :]  # [L, Hk, D]
        values = v_cache[blocks, :, positions % block_size, :]
        outs.append(attend(q[b : b + 1].reshape(1, -1, head_dim), keys, values, scale, causal=False))
    return torch.cat(outs)
