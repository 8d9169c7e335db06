"""``apply_rope`` and ``qk_norm_rope`` through ``kernels/rope.py`` (cache rows gathered in the kernel by position)."""

from __future__ import annotations

import torch

from nki_emulator import install

install()  # `import nki` in the kernels: the emulator unless the real package imports (then a no-op)

from ..kernels import rope  # noqa: E402 - after install()
from ..kernels.limits import SBUF_PARTITION_BYTES  # noqa: E402
from .bridge import KernelOp, call_kernel  # noqa: E402 - after install()

DTYPES = (torch.float32, torch.bfloat16)


def _supports(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int
) -> str | None:
    if q.dtype not in DTYPES or k.dtype != q.dtype:
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


def _apply_rope(
    backend: str, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    q_out, k_out = call_kernel(
        backend,
        rope.rope,
        q.contiguous(),
        k.contiguous(),
        positions.to(torch.int32).contiguous(),
        cos_sin_cache.contiguous(),
    )
    return q_out, k_out


def _supports_qk_norm(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
) -> str | None:
    reason = _supports(q, k, positions, cos_sin_cache, head_dim)
    if reason:
        return reason
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if tuple(w.shape) != (head_dim,) or w.dtype != q.dtype:
            return f"{name} {tuple(w.shape)} {w.dtype}; must be ({head_dim},) {q.dtype}"
    if eps <= 0:
        return f"eps={eps}; must be > 0"
    width, item = max(q.shape[1], k.shape[1]), q.element_size()
    need = width * (6 * item + 4) + head_dim * (8 + 2 * item)
    if need > SBUF_PARTITION_BYTES:
        return f"heads x head_dim={width} needs {need} B of SBUF per partition; the limit is {SBUF_PARTITION_BYTES} B"
    return None


def _qk_norm_rope(
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
        rope.qk_norm_rope,
        q.contiguous(),
        k.contiguous(),
        q_weight.detach().contiguous(),
        k_weight.detach().contiguous(),
        float(eps),
        positions.to(torch.int32).contiguous(),
        cos_sin_cache.contiguous(),
    )
    return q_out, k_out


def kernel_ops() -> list[KernelOp]:
    return [
        KernelOp(name="apply_rope", run=_apply_rope, supports=_supports),
        KernelOp(name="qk_norm_rope", run=_qk_norm_rope, supports=_supports_qk_norm),
    ]
