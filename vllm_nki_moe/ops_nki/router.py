"""``router_topk`` through ``kernels/router.py``: logits -> fp32 softmax -> top-k -> optional renormalisation."""

from __future__ import annotations

import torch

from ..emulator import install

install()  # `import nki` in the kernels: the emulator unless the real package imports (then a no-op)

from ..kernels import router  # noqa: E402 - after install()
from ..kernels.limits import TOPK8, TOPK8_MAX_ELEMS  # noqa: E402 - after install()
from .bridge import KernelOp, call_kernel  # noqa: E402 - after install()


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


def kernel_ops() -> list[KernelOp]:
    return [KernelOp(name="router_topk", run=_router_topk, supports=_supports)]
