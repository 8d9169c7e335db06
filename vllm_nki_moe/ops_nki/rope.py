"""``apply_rope`` through ``kernels/rope.py`` (cache rows gathered in the kernel by position)."""

from __future__ import annotations

import torch

from ..emulator import install

install()  # `import nki` in the kernels: the emulator unless the real package imports (then a no-op)

from ..kernels import rope  # noqa: E402 - after install()
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


def kernel_ops() -> list[KernelOp]:
    return [KernelOp(name="apply_rope", run=_apply_rope, supports=_supports)]
