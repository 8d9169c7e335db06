"""RMSNorm ops: ``rms_norm`` (layer norms and the per-head q/k norms) and ``fused_add_rms_norm``.

Reference numerics follow Hugging Face's Qwen3-MoE (``Qwen3MoeRMSNorm``): the statistic in fp32, the normed value cast
back to the activation dtype before the weight multiply. Kernels: ``kernels/rmsnorm.py``.
"""

from __future__ import annotations

import torch

from vllm_nki_moe.ops import host
from vllm_nki_moe.ops.kernel_call import call_kernel, load_kernels
from vllm_nki_moe.ops.spec import KernelImpl, OpSpec

KERNEL_DTYPES = (torch.float32, torch.bfloat16)


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


# ---------------------------------------------------------------------------------------------------------------------
# Host fast path (ops.host)


def rms_norm_host(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`rms_norm` through ``torch.ops._C.rms_norm`` (rows of the last axis; any leading shape)."""
    if not host.same_dtype(x, weight) or x.shape[-1] % host.VEC_ALIGNMENT:
        host.log_once(
            f"rms_norm: x {x.dtype} / weight {weight.dtype}, size={x.shape[-1]}; the C++ op takes equal dtypes and "
            f"sizes in multiples of {host.VEC_ALIGNMENT}; runs ops.norms.rms_norm"
        )
        return rms_norm(x, weight, eps)
    if x.numel() == 0:
        return rms_norm(x, weight, eps)
    rows = x.reshape(-1, x.shape[-1])  # a copy when x is not contiguous: the C++ op ignores strides
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    torch.ops._C.rms_norm(out, rows.contiguous(), weight.contiguous(), eps)
    return out.view(x.shape)


def fused_add_rms_norm_host(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + x`` then RMSNorm; returns (normed, new residual), inputs untouched.

    (vLLM's ``fused_add_rms_norm`` C++ op works in place on both inputs; the caller's residual may be a tensor it
    still owns, e.g. the embeddings, so the sum is a new tensor and the norm is the out-of-place op.)
    """
    new_residual = x + residual
    return rms_norm_host(new_residual, weight, eps), new_residual


# ---------------------------------------------------------------------------------------------------------------------
# NKI kernels (kernels/rmsnorm.py)


def _reason(x: torch.Tensor, weight: torch.Tensor, eps: float, tiles: int) -> str | None:
    limits = load_kernels("limits")
    if x.dtype not in KERNEL_DTYPES:
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
    if need > limits.SBUF_PARTITION_BYTES:
        return f"H={H} needs {need} B of SBUF per partition; the limit is {limits.SBUF_PARTITION_BYTES} B"
    return None


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [rows, H] (tokens, or tokens x heads for the q/k norm), contiguous for the kernel's DMA."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _rms_norm_supports(x: torch.Tensor, weight: torch.Tensor, eps: float) -> str | None:
    return _reason(x, weight, eps, load_kernels("rmsnorm")._TILES_PLAIN)


def _rms_norm_kernel(backend: str, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    kernel = load_kernels("rmsnorm").rms_norm
    out = call_kernel(backend, kernel, _rows(x), weight.detach().contiguous(), float(eps))
    return out.reshape(x.shape)


def _fused_add_rms_norm_supports(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> str | None:
    if residual.shape != x.shape or residual.dtype != x.dtype:
        return f"residual {tuple(residual.shape)} {residual.dtype}; must match x {tuple(x.shape)} {x.dtype}"
    return _reason(x, weight, eps, load_kernels("rmsnorm")._TILES_FUSED)


def _fused_add_rms_norm_kernel(
    backend: str, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = load_kernels("rmsnorm").fused_add_rms_norm
    out, new_residual = call_kernel(
        backend, kernel, _rows(x), _rows(residual), weight.detach().contiguous(), float(eps)
    )
    return out.reshape(x.shape), new_residual.reshape(x.shape)


SPECS = (
    OpSpec("rms_norm", rms_norm, rms_norm_host, KernelImpl(_rms_norm_kernel, _rms_norm_supports)),
    OpSpec(
        "fused_add_rms_norm",
        fused_add_rms_norm,
        fused_add_rms_norm_host,
        KernelImpl(_fused_add_rms_norm_kernel, _fused_add_rms_norm_supports),
    ),
)
