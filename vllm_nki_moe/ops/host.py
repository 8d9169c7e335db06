"""The ``torch`` backend's fast path on a vLLM CPU build: which of vLLM's own CPU custom ops this process has.

The op families (``norms``, ``rope``, ``moe``) keep their plain-PyTorch reference (readable, Hugging Face-exact) and,
beside it, a ``*_host`` function with the same signature that calls the C++ op vLLM's CPU platform loads
(``torch.ops._C``: ``rms_norm``, ``rotary_embedding``, ``silu_and_mul``, ``cpu_fused_moe`` with weights prepacked by
``prepack_moe_weight``), never mutating its inputs. Serving on CPU, the reference's ~100 small torch ops per layer and
its per-expert GEMMs cost about twice the time of vLLM's own Qwen3-MoE, which calls one C++ op per step of the layer.

When it is used: ``ops.bind()`` (the backend from the environment, as the model binds it) for the ``torch`` backend
(also ``auto`` off Neuron) asks :func:`unavailable_reason`: the fast ops are bound when vLLM's CPU custom ops are
already loaded in this process (vLLM's CPU platform loads them when vLLM's layers are imported,
``vllm/kernels/vllm_c.py``; this package never imports ``vllm._C`` itself: the wrong ISA build dies with "Illegal
instruction") and ``VLLM_NKI_MOE_HOST_OPS`` is not ``off``; else it logs why once and the plain reference runs.
``ops.bind("torch")`` named in code stays the plain reference unless called with ``host_ops=True``. Each fast op
checks its inputs and runs the reference for what the C++ op cannot take (a dtype it lacks, hidden size not a
multiple of 32 for the fused MoE, ...), logging the reason once.

Numerics: the C++ ops compute the same functions with another rounding (vectorised sums, FMA): float32 results
differ from the reference by a few ulp (RMSNorm and RoPE up to ~1e-6 relative; the fused MoE up to ~2e-6 of the
output scale: another summation order over H and over the top-k experts, routing weights applied in fp32).
bfloat16 differs by up to 1 bf16 ulp (the C++ ops round once where Hugging Face rounds the normed value before
the weight multiply). Greedy tokens can therefore differ from Hugging Face's on a near-tie of the top two logits;
``VLLM_NKI_MOE_HOST_OPS=off`` runs the bit-exact reference.
"""

from __future__ import annotations

import logging

import torch

from vllm_nki_moe import envs

logger = logging.getLogger(__name__)

# The vLLM CPU custom ops the fast path calls (csrc/cpu/torch_bindings.cpp of vLLM's CPU build).
REQUIRED_C_OPS = ("rms_norm", "rotary_embedding", "silu_and_mul", "prepack_moe_weight", "cpu_fused_moe")
# rms_norm and silu_and_mul walk the last axis in 8-element vectors and reject other sizes (TORCH_CHECK in vLLM's
# csrc/cpu/layernorm.cpp; measured on this AVX2 build: 8, 16, 24... accepted, 2 and 4 rejected); 16 leaves room for a
# build with 16-wide vectors.
VEC_ALIGNMENT = 16
C_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_logged: set[str] = set()


def log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info("vllm_nki_moe.ops.host: %s", message)


def _c_op(name: str):
    """``torch.ops._C.<name>`` if vLLM's CPU build has registered it in this process, else None."""
    try:
        return getattr(torch.ops._C, name)
    except (AttributeError, RuntimeError):
        return None


def unavailable_reason() -> str | None:
    """Why the fast path cannot be used in this process, or None if it can."""
    if envs.host_ops() == "off":
        return f"{envs.HOST_OPS_ENV}=off"
    missing = [name for name in REQUIRED_C_OPS if _c_op(name) is None]
    if missing:
        return (
            f"vLLM's CPU custom ops are not loaded (torch.ops._C lacks {', '.join(missing)}); they load with vLLM's "
            f"CPU platform (importing vLLM's layers)"
        )
    return None


def same_dtype(*tensors: torch.Tensor) -> bool:
    """All of one dtype the C++ ops take."""
    dtype = tensors[0].dtype
    return dtype in C_DTYPES and all(t.dtype == dtype for t in tensors)
