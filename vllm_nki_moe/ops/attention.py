"""Paged attention ops: ``attention_prefill`` (causal, one sequence from position 0) and ``attention_decode`` (one new
token per sequence against the paged cache); both write the new K/V into the cache first.

The reference is ``kernels/attention_ref.py`` (the same math the kernels' ``_ref`` functions use; it imports no
``nki``). Kernels: ``kernels/attention_prefill.py`` and ``attention_decode.py``; they take the model's layouts as they
are (q ``[T, Hq*D]``, k/v ``[T, Hk*D]``, the HND paged cache); the wrappers cast the index tensors to int32 and make
the cache update visible in the caller's tensors: a kernel returns the caches it wrote (NKI kernels write arguments
only by returning them), which are new tensors under the emulator and are copied back; on real ``nki`` they are the
same device buffers and nothing is copied.
"""

from __future__ import annotations

import torch

from vllm_nki_moe.kernels import attention_ref
from vllm_nki_moe.ops.kernel_call import call_kernel, launch_grid, load_kernels
from vllm_nki_moe.ops.spec import KernelImpl, OpSpec

KERNEL_DTYPES = (torch.float32, torch.bfloat16)


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
    attention_ref.write_kv_cache_(k_cache, v_cache, k, v, slot_mapping)
    return attention_ref.attend_prefill(q, k, v, k_cache.shape[-1], scale)


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
    attention_ref.write_kv_cache_(k_cache, v_cache, k, v, slot_mapping)
    return attention_ref.attend_decode(q, k_cache, v_cache, block_tables, context_lens, scale)


# ---------------------------------------------------------------------------------------------------------------------
# NKI kernels (kernels/attention_prefill.py, kernels/attention_decode.py)


def _check_cache(q, k, v, k_cache, v_cache, slot_mapping) -> str | None:
    """The limits both kernels share (kernels/attention_prefill.py ``_check_cache_args``), as a reason or None."""
    prefill_kernel = load_kernels("attention_prefill")
    tensors = {"q": q, "k": k, "v": v, "k_cache": k_cache, "v_cache": v_cache}
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if q.dtype not in KERNEL_DTYPES or len(set(dtypes.values())) != 1:
        return f"dtypes {dtypes}; the kernels take one dtype, float32 or bfloat16, for all of them"
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        return f"k_cache{tuple(k_cache.shape)}, v_cache{tuple(v_cache.shape)}; must both be [NB, Hk, BS, D]"
    nb, hk, bs, d = k_cache.shape
    if d > prefill_kernel.MAX_HEAD_DIM:
        return f"head_dim={d}; the kernels take at most {prefill_kernel.MAX_HEAD_DIM} (QK^T contracts on partitions)"
    if bs & (bs - 1):
        return f"block_size={bs}; the kernels need a power of two"
    if nb * hk * bs > prefill_kernel.MAX_CACHE_ROWS:
        return f"cache rows={nb * hk * bs}; the kernels address at most {prefill_kernel.MAX_CACHE_ROWS}"
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] % d or k.shape != (q.shape[0], hk * d) or v.shape != k.shape:
        return f"q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}; must be [T, Hq*{d}], [T, {hk}*{d}] x 2"
    if (q.shape[1] // d) % hk:
        return f"q heads={q.shape[1] // d}, kv heads={hk}; q heads must be a multiple of kv heads"
    if slot_mapping.shape != (q.shape[0],):
        return f"slot_mapping.shape={tuple(slot_mapping.shape)}; must be ({q.shape[0]},)"
    return None


def _attention_prefill_supports(q, k, v, k_cache, v_cache, slot_mapping, scale) -> str | None:
    reason = _check_cache(q, k, v, k_cache, v_cache, slot_mapping)
    if reason:
        return reason
    prefill_kernel, limits = load_kernels("attention_prefill"), load_kernels("limits")
    tokens, d = q.shape[0], k_cache.shape[-1]
    if not 1 <= tokens <= prefill_kernel.MAX_PREFILL_TOKENS:
        return f"T={tokens}; the prefill kernel takes 1..{prefill_kernel.MAX_PREFILL_TOKENS} tokens"
    kv_bytes = (tokens + -(-tokens // limits.PMAX) * d) * q.element_size()
    if kv_bytes > limits.SBUF_PARTITION_BYTES // 2:
        return f"T={tokens}, D={d}: K/V of a head need {kv_bytes} B of SBUF per partition; at most half the SBUF"
    return None


def _attention_decode_supports(
    q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, scale
) -> str | None:
    reason = _check_cache(q, k, v, k_cache, v_cache, slot_mapping)
    if reason:
        return reason
    decode_kernel = load_kernels("attention_decode")
    batch = q.shape[0]
    hk, bs, d = k_cache.shape[1:]
    if batch < 1 or block_tables.dim() != 2 or block_tables.shape[0] != batch or context_lens.shape != (batch,):
        return f"block_tables{tuple(block_tables.shape)}, context_lens{tuple(context_lens.shape)}; for B={batch}"
    if q.shape[1] // d // hk > decode_kernel.MAX_QUERY_GROUP:
        return f"q heads per kv head={q.shape[1] // d // hk}; the decode kernel takes at most 128"
    if 2 * bs * d * q.element_size() > decode_kernel.KV_TILE_SBUF_BYTES:
        return f"block_size={bs}, head_dim={d}: K/V block tiles exceed {decode_kernel.KV_TILE_SBUF_BYTES} B"
    return None


def _write_back(cache: torch.Tensor, returned: torch.Tensor) -> None:
    if returned.data_ptr() != cache.data_ptr():
        cache.copy_(returned)


def _attention_prefill_kernel(backend: str, q, k, v, k_cache, v_cache, slot_mapping, scale) -> torch.Tensor:
    out, k_new, v_new = call_kernel(
        backend,
        load_kernels("attention_prefill").attention_prefill,
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        k_cache,
        v_cache,
        slot_mapping.to(torch.int32).contiguous(),
        float(scale),
    )
    _write_back(k_cache, k_new)
    _write_back(v_cache, v_new)
    return out


def _attention_decode_kernel(
    backend: str, q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, scale
) -> torch.Tensor:
    out, k_new, v_new = call_kernel(
        backend,
        load_kernels("attention_decode").attention_decode,
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        k_cache,
        v_cache,
        slot_mapping.to(torch.int32).contiguous(),
        block_tables.to(torch.int32).contiguous(),
        context_lens.to(torch.int32).contiguous(),
        float(scale),
        grid=launch_grid(backend),  # the sequences split over the physical cores (kernels/attention_decode.py, "Grid")
    )
    _write_back(k_cache, k_new)
    _write_back(v_cache, v_new)
    return out


# Both write the caches in place (and decode's reference loops over context lengths on the host): opaque ops.
SPECS = (
    OpSpec(
        "attention_prefill",
        attention_prefill,
        kernel=KernelImpl(_attention_prefill_kernel, _attention_prefill_supports),
        traceable=False,
    ),
    OpSpec(
        "attention_decode",
        attention_decode,
        kernel=KernelImpl(_attention_decode_kernel, _attention_decode_supports),
        traceable=False,
    ),
)
