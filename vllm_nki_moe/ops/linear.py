"""The dense projection op: ``linear(x, weight) -> x @ weight^T`` (``nn.Linear``'s weight ``[N, K]``).

The model's projections (q/k/v, o, the dense MLP) and its LM head are vLLM's parallel layers, which keep tensor
parallelism (sharded loading, the all-reduce after a row-parallel layer); under a kernel backend their matmul is this
op (``models.linear_method.OpsLinearMethod``), so it runs ``kernels/linear.py``. The torch backend leaves vLLM's layers
as they are (vLLM's CPU GEMM dispatch is faster than anything here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_nki_moe.ops.kernel_call import call_kernel, launch_grid, load_kernels
from vllm_nki_moe.ops.spec import KernelImpl, OpSpec, WeightLayouts
from vllm_nki_moe.ops.weight_cache import WeightCache

KERNEL_DTYPES = (torch.bfloat16, torch.float32)
_weights = WeightCache()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [T, K] @ weight [N, K]^T -> [T, N]`` in x's dtype."""
    return F.linear(x, weight)


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    return weight.t().contiguous()


def prepare_linear_for_kernels(weight: torch.Tensor) -> None:
    """Store ``weight [N, K]`` column-major, in place, once after loading: its transpose ``[K, N]`` (the kernel's
    layout) is then a contiguous view and ``F.linear`` reads the same tensor through its strides: one copy."""
    if weight.dim() == 2 and not weight.t().is_contiguous():
        weight.data = weight.data.t().contiguous().t()


def _no_conversion(*weights: torch.Tensor) -> None:
    """vLLM's layers keep their own weights on the torch backend."""


def _linear_supports(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1] or x.shape[0] == 0:
        return f"x {tuple(x.shape)}, weight {tuple(weight.shape)}; must be [T >= 1, K], [N, K]"
    if x.dtype != weight.dtype or x.dtype not in KERNEL_DTYPES:
        return f"x.dtype={x.dtype}, weight.dtype={weight.dtype}; one of float32, bfloat16, equal"
    limits = load_kernels("limits")
    K, T = x.shape[1], x.shape[0]
    tiles = -(-K // limits.PMAX)
    if K % tiles:
        return f"K={K}; the kernel needs ceil(K/{limits.PMAX})={tiles} equal partition tiles"
    kernel = load_kernels("linear")
    need = (T * tiles + tiles * kernel.N_TILE + kernel.ROWS_PER_TILE) * x.element_size()
    if need > limits.SBUF_PARTITION_BYTES:
        return f"T={T}, K={K}; need {need} B of SBUF per partition, more than {limits.SBUF_PARTITION_BYTES}"
    return None


def kernel_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` as the kernels read it, W^T ``[K, N]`` contiguous: a view of a prepared (column-major)
    weight; otherwise converted once and cached."""
    return weight.t() if weight.t().is_contiguous() else _weights.get(_transposed, weight)


def _linear_kernel(backend: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    weight_t = kernel_weight(weight)
    # one program per physical core of the logical core (kernels/linear.py, "Grid")
    grid = launch_grid(backend)
    return call_kernel(backend, load_kernels("linear").linear, x.contiguous(), weight_t, grid=grid)


SPECS = (
    OpSpec(
        "linear",
        linear,
        kernel=KernelImpl(_linear_kernel, _linear_supports),
        weights=WeightLayouts(_no_conversion, prepare_linear_for_kernels),
    ),
)
