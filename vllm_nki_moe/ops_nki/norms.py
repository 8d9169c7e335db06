"""``rms_norm`` (layer norms and the per-head q/k norms) and ``fused_add_rms_norm`` through ``kernels/rmsnorm.py``."""

from __future__ import annotations

import torch

from nki_emulator import install

install()  # `import nki` in the kernels: the emulator unless the real package imports (then a no-op)

from ..kernels import rmsnorm  # noqa: E402 - after install()
from ..kernels.limits import SBUF_PARTITION_BYTES  # noqa: E402 - after install()
from .bridge import KernelOp, call_kernel  # noqa: E402 - after install()

DTYPES = (torch.float32, torch.bfloat16)


def _reason(x: torch.Tensor, weight: torch.Tensor, eps: float, tiles: int) -> str | None:
    if x.dtype not in DTYPES:
        return f"x.dtype={x.dtype}; the kernel takes float32 or bfloat16"
    if weight.dtype != x.dtype:
        return f"weight.dtype={weight.dtype}; the kernel needs the activation dtype {x.dtype}"
    if x.dim() < 1 or x.numel() == 0:
        return f"x.shape={tuple(x.shape)}; the kernel needs at least one row"
    H = x.shape[-1]
    if tuple(weight.shape) != (H,):
        return f"weight.shape={tuple(weight.shape)}; must be ({H},)"
    if eps <= 0:
        return f"eps={eps}; must be > 0"
    need = H * (tiles + 1) * x.element_size()
    if need > SBUF_PARTITION_BYTES:
        return f"H={H} needs {need} B of SBUF per partition; the limit is {SBUF_PARTITION_BYTES} B"
    return None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [rows, H] (tokens, or tokens x heads for the q/k norm), contiguous for the kernel's DMA."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _rms_norm(backend: str, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = call_kernel(backend, rmsnorm.rms_norm, _rows(x), weight.detach().contiguous(), float(eps))
    return out.reshape(x.shape)


def _fused_add_rms_norm(
    backend: str, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, new_residual = call_kernel(
        backend, rmsnorm.fused_add_rms_norm, _rows(x), _rows(residual), weight.detach().contiguous(), float(eps)
    )
    return out.reshape(x.shape), new_residual.reshape(x.shape)


def _supports_fused(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> str | None:
    if residual.shape != x.shape or residual.dtype != x.dtype:
        return f"residual {tuple(residual.shape)} {residual.dtype}; must match x {tuple(x.shape)} {x.dtype}"
    return _reason(x, weight, eps, rmsnorm._TILES_FUSED)


def kernel_ops() -> list[KernelOp]:
    return [
        KernelOp(
            name="rms_norm",
            run=_rms_norm,
            supports=lambda x, weight, eps: _reason(x, weight, eps, rmsnorm._TILES_PLAIN),
        ),
        KernelOp(name="fused_add_rms_norm", run=_fused_add_rms_norm, supports=_supports_fused),
    ]
