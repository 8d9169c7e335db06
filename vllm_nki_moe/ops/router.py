"""Router ops: ``router_topk`` (logits -> fp32 softmax -> top-k -> optional renormalisation) and ``router_gate_topk``
(the same with the gate matmul; a composite op). Kernels: ``kernels/router.py`` (``router_topk`` and
``router_topk_matmul``, which takes the gate weight transposed, ``[H, E]``: that copy is made once per weight,
``ops.weight_cache``). Where ``router_topk_matmul`` cannot take the shapes (H not a multiple of 128, E over one PSUM
bank), ``router_gate_topk`` runs as the gate matmul in torch followed by the ``router_topk`` op.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from vllm_nki_moe.ops.kernel_call import call_kernel, load_kernels
from vllm_nki_moe.ops.spec import KernelImpl, OpSpec, WeightLayouts
from vllm_nki_moe.ops.weight_cache import WeightCache

KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def router_topk(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts in fp32, top-k (ties as torch.topk), optional renormalisation to sum 1.

    Returns (weights ``[T, K]`` fp32, expert ids ``[T, K]`` int64), best first.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def router_gate_topk_sequence(impls: dict[str, Callable]) -> Callable:
    """The router with its gate matmul: ``router_topk(hidden @ gate_weight.T, top_k, renormalize)``.

    ``router_gate_topk(hidden [T, H], gate_weight [E, H], top_k, renormalize) -> (weights [T, K] fp32,
    ids [T, K] int64)``; a backend with a kernel for the whole (``router_topk_matmul``) runs the gate matmul there.
    """
    bound_router_topk = impls["router_topk"]

    def router_gate_topk(
        hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return bound_router_topk(F.linear(hidden, gate_weight), top_k, renormalize)

    return router_gate_topk


# ---------------------------------------------------------------------------------------------------------------------
# NKI kernels (kernels/router.py)


def _router_topk_supports(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> str | None:
    limits = load_kernels("limits")
    if router_logits.dtype not in KERNEL_DTYPES:
        return f"router_logits.dtype={router_logits.dtype}; the kernel takes float32 or bfloat16"
    if router_logits.dim() != 2 or router_logits.shape[0] == 0:
        return f"router_logits.shape={tuple(router_logits.shape)}; must be [T >= 1, E]"
    E = router_logits.shape[1]
    if not 1 <= top_k <= min(limits.TOPK8, E):
        return f"top_k={top_k}; the kernel supports 1..{limits.TOPK8} (max8) and at most E={E}"
    if E > limits.TOPK8_MAX_ELEMS:
        return f"E={E}; max8 reads at most {limits.TOPK8_MAX_ELEMS} elements per partition"
    return None


def _router_topk_kernel(backend: str, router_logits: torch.Tensor, top_k: int, renormalize: bool):
    kernel = load_kernels("router").router_topk
    weights, ids = call_kernel(backend, kernel, router_logits.contiguous(), int(top_k), bool(renormalize))
    return weights, ids.to(torch.int64)


_gate_weights = WeightCache()


def _transposed(gate_weight: torch.Tensor) -> torch.Tensor:
    """``[H, E]`` contiguous: a view of a weight :func:`prepare_gate_for_kernels` converted, else a copy (cached)."""
    return gate_weight.t().contiguous()


def prepare_gate_for_kernels(gate_weight: torch.Tensor) -> None:
    """Store the router weight ``[E, H]`` column-major, in place, once after loading: its transpose ``[H, E]`` is then
    a contiguous view, which is both kernels' layout (``router_topk_matmul``'s ``gate_weight_t``, and
    ``moe_block_decode``'s ``[HP, KT, E]``, the same bytes split as h = hp * KT + kt), so the model keeps one copy and
    the torch path (``F.linear``) reads the same tensor through its strides."""
    if not gate_weight.t().is_contiguous():
        gate_weight.data = gate_weight.data.t().contiguous().t()


def _no_conversion(*weights: torch.Tensor) -> None:
    """vLLM's CPU path reads the router weight as the checkpoint stores it."""


def _router_gate_topk_supports(
    hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool
) -> str | None:
    limits, router = load_kernels("limits"), load_kernels("router")
    if hidden.dim() != 2 or hidden.shape[0] == 0 or gate_weight.dim() != 2 or gate_weight.shape[1] != hidden.shape[1]:
        return f"hidden {tuple(hidden.shape)}, gate_weight {tuple(gate_weight.shape)}; must be [T >= 1, H], [E, H]"
    if gate_weight.dtype != hidden.dtype or hidden.dtype not in KERNEL_DTYPES:
        return f"hidden.dtype={hidden.dtype}, gate_weight.dtype={gate_weight.dtype}; one of float32, bfloat16"
    H, E = hidden.shape[1], gate_weight.shape[0]
    if H % limits.PMAX:
        return f"H={H}; router_topk_matmul needs a multiple of {limits.PMAX}"
    if E > router.MAX_GATE_EXPERTS:
        return f"E={E}; router_topk_matmul takes at most {router.MAX_GATE_EXPERTS} (one PSUM bank)"
    if not 1 <= top_k <= min(limits.TOPK8, E):
        return f"top_k={top_k}; the kernel supports 1..{limits.TOPK8} (max8) and at most E={E}"
    return None


def _router_gate_topk_kernel(
    backend: str, hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool
):
    # prepared (column-major): the transpose is the kernel's layout as a view; otherwise converted once, cached
    weight_t = gate_weight.t() if gate_weight.t().is_contiguous() else _gate_weights.get(_transposed, gate_weight)
    kernel = load_kernels("router").router_topk_matmul
    weights, ids = call_kernel(backend, kernel, hidden.contiguous(), weight_t, int(top_k), bool(renormalize))
    return weights, ids.to(torch.int64)


SPECS = (
    OpSpec("router_topk", router_topk, kernel=KernelImpl(_router_topk_kernel, _router_topk_supports)),
    OpSpec(
        "router_gate_topk",
        kernel=KernelImpl(_router_gate_topk_kernel, _router_gate_topk_supports),
        compose=router_gate_topk_sequence,
        # the sequence (F.linear) reads any strides: no other fallback is needed
        weights=WeightLayouts(_no_conversion, prepare_gate_for_kernels),
    ),
)
