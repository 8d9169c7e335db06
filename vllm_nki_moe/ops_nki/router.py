"""``router_topk`` (logits -> fp32 softmax -> top-k -> optional renormalisation) and ``router_gate_topk`` (the same
with the gate matmul in the kernel, ``router_topk_matmul``) through ``kernels/router.py``.

``router_topk_matmul`` takes the gate weight transposed (``[H, E]``, its kernel layout); the wrapper makes that copy
once per weight (``bridge.KernelWeights``). Where the kernel cannot take the shapes (H not a multiple of 128, E over
one PSUM bank), ``router_gate_topk`` runs as the gate matmul in torch followed by the ``router_topk`` kernel.
"""

from __future__ import annotations

import torch

from nki_emulator import install

install()  # `import nki` in the kernels: the emulator unless the real package imports (then a no-op)

from ..kernels import router  # noqa: E402 - after install()
from ..kernels.limits import PMAX, TOPK8, TOPK8_MAX_ELEMS  # noqa: E402 - after install()
from .bridge import KernelOp, KernelWeights, call_kernel  # noqa: E402 - after install()


def _supports(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> str | None:
    if router_logits.dtype not in (torch.float32, torch.bfloat16):
        return f"router_logits.dtype={router_logits.dtype}; the kernel takes float32 or bfloat16"
    if router_logits.dim() != 2 or router_logits.shape[0] == 0:
        return f"router_logits.shape={tuple(router_logits.shape)}; must be [T >= 1, E]"
    E = router_logits.shape[1]
    if not 1 <= top_k <= min(TOPK8, E):
        return f"top_k={top_k}; the kernel supports 1..{TOPK8} (max8) and at most E={E}"
    if E > TOPK8_MAX_ELEMS:
        return f"E={E}; max8 reads at most {TOPK8_MAX_ELEMS} elements per partition"
    return None


def _router_topk(backend: str, router_logits: torch.Tensor, top_k: int, renormalize: bool):
    weights, ids = call_kernel(backend, router.router_topk, router_logits.contiguous(), int(top_k), bool(renormalize))
    return weights, ids.to(torch.int64)


_gate_weights = KernelWeights()


def _transposed(gate_weight: torch.Tensor) -> torch.Tensor:
    return gate_weight.t().contiguous()


def _gate_supports(hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool) -> str | None:
    if hidden.dim() != 2 or hidden.shape[0] == 0 or gate_weight.dim() != 2 or gate_weight.shape[1] != hidden.shape[1]:
        return f"hidden {tuple(hidden.shape)}, gate_weight {tuple(gate_weight.shape)}; must be [T >= 1, H], [E, H]"
    if gate_weight.dtype != hidden.dtype or hidden.dtype not in (torch.float32, torch.bfloat16):
        return f"hidden.dtype={hidden.dtype}, gate_weight.dtype={gate_weight.dtype}; one of float32, bfloat16"
    H, E = hidden.shape[1], gate_weight.shape[0]
    if H % PMAX:
        return f"H={H}; router_topk_matmul needs a multiple of {PMAX}"
    if E > router.MAX_GATE_EXPERTS:
        return f"E={E}; router_topk_matmul takes at most {router.MAX_GATE_EXPERTS} (one PSUM bank)"
    if not 1 <= top_k <= min(TOPK8, E):
        return f"top_k={top_k}; the kernel supports 1..{TOPK8} (max8) and at most E={E}"
    return None


def _router_gate_topk(backend: str, hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool):
    weight_t = _gate_weights.get(_transposed, gate_weight)
    weights, ids = call_kernel(
        backend, router.router_topk_matmul, hidden.contiguous(), weight_t, int(top_k), bool(renormalize)
    )
    return weights, ids.to(torch.int64)


def kernel_ops() -> list[KernelOp]:
    return [
        KernelOp(name="router_topk", run=_router_topk, supports=_supports),
        KernelOp(name="router_gate_topk", run=_router_gate_topk, supports=_gate_supports, composite=True),
    ]
