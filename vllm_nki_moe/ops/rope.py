"""Rotary embedding ops: ``apply_rope`` (neox, rotate halves) and ``qk_norm_rope`` (Qwen3's per-head q/k RMSNorm then
RoPE in one call), and the cos/sin cache they read. Kernels: ``kernels/rope.py`` (cache rows gathered in the kernel
by position)."""

from __future__ import annotations

import math

import torch

from vllm_nki_moe.ops import host
from vllm_nki_moe.ops.kernel_call import call_kernel, load_kernels
from vllm_nki_moe.ops.norms import rms_norm, rms_norm_host
from vllm_nki_moe.ops.spec import KernelImpl, OpSpec
from vllm_nki_moe.ops.weight_cache import WeightCache

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# rotary_embedding vectorises half a head; with a scalar tail (half not a multiple of its vector) the bfloat16 path
# crashed on this build (head_dim 24: segmentation fault), so the fast path takes head_dim in multiples of 32 only.
ROPE_HEAD_ALIGNMENT = 32


def rope_cos_sin_cache(
    head_dim: int, max_positions: int, theta: float, llama3: tuple[float, float, float, int] | None = None
) -> torch.Tensor:
    """``[max_positions, head_dim]`` fp32: cos in the first half of each row, sin in the second (neox layout).

    Computed as transformers' default rope does (int64 arange cast to fp32, fp32 outer product), so that the angles
    are bit-identical to Hugging Face's. ``llama3``: (factor, low_freq_factor, high_freq_factor, original context)
    rescales the inverse frequencies as Llama 3.1+ does (``llama3_inv_freq``).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if llama3 is not None:
        inv_freq = llama3_inv_freq(inv_freq, *llama3)
    freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def llama3_inv_freq(
    inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float, original_context: int
) -> torch.Tensor:
    """Llama 3 frequency scaling: wavelengths longer than ``original_context / low_freq_factor`` are divided by
    ``factor``, those shorter than ``original_context / high_freq_factor`` kept, and the band between interpolated
    linearly in ``original_context / wavelength``."""
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


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


# ---------------------------------------------------------------------------------------------------------------------
# Host fast path (ops.host)

# The cache in the activation dtype (the C++ op wants them equal), converted once per cache and dtype.
_cos_sin = WeightCache(fingerprint=False)
_TO_DTYPE = {dtype: (lambda cache, dtype=dtype: cache.to(dtype).contiguous()) for dtype in host.C_DTYPES}


def _cos_sin_in(cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if cache.dtype == dtype and cache.is_contiguous():
        return cache
    return _cos_sin.get(_TO_DTYPE[dtype], cache)


def _rope_in_place(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int
) -> None:
    """Neox RoPE of contiguous ``q [T, Hq*D]`` and ``k [T, Hk*D]`` we own, in place."""
    if positions.numel() and int(positions.max()) >= cos_sin_cache.shape[0]:  # the C++ op would read past the cache
        raise IndexError(
            f"ops.rope.apply_rope_host: position={int(positions.max())}; "
            f"must be < {cos_sin_cache.shape[0]} (cache rows)"
        )
    cache = _cos_sin_in(cos_sin_cache, q.dtype)
    torch.ops._C.rotary_embedding(positions.long(), q, k, head_dim, cache, True)


def _host_reason(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int) -> str | None:
    if not host.same_dtype(q, k):
        return f"q {q.dtype} / k {k.dtype}"
    if cos_sin_cache.shape[-1] != head_dim:
        return f"cos_sin_cache width={cos_sin_cache.shape[-1]}; rotary over the whole head_dim={head_dim} only"
    if head_dim % ROPE_HEAD_ALIGNMENT:
        return f"head_dim={head_dim}; the C++ op is used for multiples of {ROPE_HEAD_ALIGNMENT}"
    return None


def apply_rope_host(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_rope` through ``torch.ops._C.rotary_embedding`` (neox) on fresh contiguous copies."""
    reason = _host_reason(q, k, cos_sin_cache, head_dim)
    if reason is not None or q.numel() == 0:
        if reason is not None:
            host.log_once(f"apply_rope: {reason}; runs ops.rope.apply_rope")
        return apply_rope(q, k, positions, cos_sin_cache, head_dim)
    q_out = q.clone(memory_format=torch.contiguous_format)
    k_out = k.clone(memory_format=torch.contiguous_format)
    _rope_in_place(q_out, k_out, positions, cos_sin_cache, head_dim)
    return q_out, k_out


def qk_norm_rope_host(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`qk_norm_rope`: per-head RMSNorm of q and k (``_C.rms_norm`` over ``[T*H, D]`` rows) then RoPE in place
    on those fresh outputs; q/k may be strided views of the fused qkv projection."""
    reason = _host_reason(q, k, cos_sin_cache, head_dim) or (
        None if host.same_dtype(q, q_weight, k_weight) else f"weights {q_weight.dtype}/{k_weight.dtype} vs q {q.dtype}"
    )
    if reason is not None or q.numel() == 0:
        if reason is not None:
            host.log_once(f"qk_norm_rope: {reason}; runs ops.rope.qk_norm_rope")
        return qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos_sin_cache, head_dim)
    q_out = rms_norm_host(q.reshape(-1, head_dim), q_weight, eps).view(q.shape)
    k_out = rms_norm_host(k.reshape(-1, head_dim), k_weight, eps).view(k.shape)
    _rope_in_place(q_out, k_out, positions, cos_sin_cache, head_dim)
    return q_out, k_out


# ---------------------------------------------------------------------------------------------------------------------
# NKI kernels (kernels/rope.py)


def _apply_rope_supports(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int
) -> str | None:
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype:
        return f"q.dtype={q.dtype}, k.dtype={k.dtype}; the kernel takes float32 or bfloat16, the same for both"
    if q.dim() != 2 or k.dim() != 2 or q.shape[0] == 0 or k.shape[0] != q.shape[0]:
        return f"q{tuple(q.shape)}, k{tuple(k.shape)}; must be [T, heads*head_dim] with the same T >= 1"
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        return f"cos_sin_cache{tuple(cos_sin_cache.shape)}; must be [positions, head_dim={head_dim}] (full rotary)"
    if cos_sin_cache.dtype != torch.float32:
        return f"cos_sin_cache.dtype={cos_sin_cache.dtype}; must be float32"
    if head_dim % 2 or q.shape[1] % head_dim or k.shape[1] % head_dim:
        return f"head_dim={head_dim}, q width {q.shape[1]}, k width {k.shape[1]}; widths must be multiples of it"
    if positions.shape != (q.shape[0],):
        return f"positions.shape={tuple(positions.shape)}; must be ({q.shape[0]},)"
    if cos_sin_cache.shape[0] > 2**31 - 1:
        return f"cos_sin_cache has {cos_sin_cache.shape[0]} rows; int32 positions cannot address them"
    return None


def _apply_rope_kernel(
    backend: str, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, k_out = call_kernel(
        backend,
        load_kernels("rope").rope,
        q.contiguous(),
        k.contiguous(),
        positions.to(torch.int32).contiguous(),
        cos_sin_cache.contiguous(),
    )
    return q_out, k_out


def _qk_norm_rope_supports(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
) -> str | None:
    reason = _apply_rope_supports(q, k, positions, cos_sin_cache, head_dim)
    if reason:
        return reason
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if tuple(w.shape) != (head_dim,) or w.dtype != q.dtype:
            return f"{name} {tuple(w.shape)} {w.dtype}; must be ({head_dim},) {q.dtype}"
    if eps <= 0:
        return f"eps={eps}; must be > 0"
    sbuf = load_kernels("limits").SBUF_PARTITION_BYTES
    width, item = max(q.shape[1], k.shape[1]), q.element_size()
    need = width * (6 * item + 4) + head_dim * (8 + 2 * item)
    if need > sbuf:
        return f"heads x head_dim={width} needs {need} B of SBUF per partition; the limit is {sbuf} B"
    return None


def _qk_norm_rope_kernel(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, k_out = call_kernel(
        backend,
        load_kernels("rope").qk_norm_rope,
        q.contiguous(),
        k.contiguous(),
        q_weight.detach().contiguous(),
        k_weight.detach().contiguous(),
        float(eps),
        positions.to(torch.int32).contiguous(),
        cos_sin_cache.contiguous(),
    )
    return q_out, k_out


SPECS = (
    OpSpec("apply_rope", apply_rope, apply_rope_host, KernelImpl(_apply_rope_kernel, _apply_rope_supports)),
    OpSpec("qk_norm_rope", qk_norm_rope, qk_norm_rope_host, KernelImpl(_qk_norm_rope_kernel, _qk_norm_rope_supports)),
)
