"""Kernel-check cases for ``kernels/router.py``: one router top-k per MoE layer at one rank's shapes.

Per MoE layer the model's ``moe_block`` routes once: inside the fused MoE block where that runs
(``ops.moe.fused_block_applies``), else through ``router_gate_topk``, which is ``router_topk_matmul`` (the gate
matmul in the kernel) where that kernel takes the shapes and the gate matmul in torch plus ``router_topk`` elsewhere.
The case that runs counts once; the other is checked and costed but counts 0.
"""

from __future__ import annotations

import numpy as np
import torch

from nki_emulator import install

install()  # `import nki` in the kernels: the emulator unless the real package imports (then a no-op)

from vllm_nki_moe.kernels import router  # noqa: E402 - after install()
from vllm_nki_moe.kernels.limits import PMAX, TOPK8  # noqa: E402
from vllm_nki_moe.ops.moe import fused_block_applies  # noqa: E402
from vllm_nki_moe.tools.kernel_check.registry import KernelCase  # noqa: E402
from vllm_nki_moe.tools.kernel_check.shapes import KernelShapes  # noqa: E402

_DT_NAMES = {"bfloat16": "bf16", "float32": "fp32"}


def cases(shapes: KernelShapes, tokens: int) -> list[KernelCase]:
    s, T, E, K = shapes, tokens, shapes.experts, shapes.top_k
    if E == 0:  # a dense model: no router
        return []
    dt = s.torch_dtype
    fused = fused_block_applies(T, K, E)  # the fused block (bf16 or FP8 experts) carries norm and router

    def inputs(rng: np.random.Generator) -> tuple:
        # Router logits of a trained model are a few units wide; scale 2 gives a realistic softmax spread.
        logits = torch.from_numpy(rng.standard_normal((T, E), dtype=np.float32) * 2.0).to(dt)
        return logits, K, s.norm_topk_prob

    unsupported = None
    if K > TOPK8:
        unsupported = f"top_k={K}; the kernel supports at most {TOPK8} (max8)"
    H = s.hidden

    def matmul_inputs(rng: np.random.Generator) -> tuple:
        x = torch.from_numpy(rng.standard_normal((T, H), dtype=np.float32)).to(dt)
        # std 2/sqrt(H) makes the logits N(0, 4), the spread of the logits case above
        w = torch.from_numpy(rng.standard_normal((H, E), dtype=np.float32) * (2.0 / H**0.5)).to(dt)
        return x, w, K, s.norm_topk_prob

    matmul_unsupported = unsupported
    if H % PMAX:
        matmul_unsupported = f"H={H}; router_topk_matmul needs a multiple of {PMAX}"
    elif E > router.MAX_GATE_EXPERTS:
        matmul_unsupported = f"E={E}; router_topk_matmul takes at most {router.MAX_GATE_EXPERTS} (one PSUM bank)"
    return [
        KernelCase(
            kernel="router_topk",
            shapes=f"T={T} E={E} k={K} renorm={int(s.norm_topk_prob)} {_DT_NAMES[s.dtype]}",
            build_inputs=inputs,
            kernel_fn=router.router_topk,
            reference=router.router_topk_ref,
            tolerance="float32",  # fp32 weights; ids compared exactly
            min_hbm_bytes=T * E * dt.itemsize + T * K * (4 + 4),
            calls_per_layer=0 if fused or not matmul_unsupported else 1,
            unsupported=unsupported,
        ),
        KernelCase(
            kernel="router_topk_matmul",
            shapes=f"T={T} H={H} E={E} k={K} renorm={int(s.norm_topk_prob)} {_DT_NAMES[s.dtype]}",
            build_inputs=matmul_inputs,
            kernel_fn=router.router_topk_matmul,
            reference=router.router_topk_matmul_ref,
            tolerance="float32_matmul",  # fp32 logits from an H-term PSUM accumulation; ids compared exactly
            min_hbm_bytes=T * H * dt.itemsize + H * E * dt.itemsize + T * K * (4 + 4),
            calls_per_layer=0 if fused or matmul_unsupported else 1,
            unsupported=matmul_unsupported,
        ),
    ]
