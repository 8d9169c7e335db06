"""The one dispatch point between the model and its kernels.

Every op the Qwen3-MoE model runs outside vLLM's own layers goes through an :class:`OpSet`, bound once per model by
:func:`bind` from ``VLLM_NKI_MOE_KERNELS``:

- ``torch``: PyTorch, the default off Neuron. Bound from the environment (``bind()``, as the model does) where vLLM's
  CPU custom ops are loaded (serving on a vLLM CPU build), the norms, RoPE, SiLU and experts run them (``ops_host``:
  same functions, C++ rounding, prepacked fused MoE); elsewhere, with ``VLLM_NKI_MOE_HOST_OPS=off``, or named in
  code (``bind("torch")``: the baseline tests and tools compare against), every op is the plain Hugging Face-exact
  reference ``ops_torch``; ``bind(..., host_ops=True|False)`` chooses explicitly;
- ``emulator``: the NKI kernels in ``vllm_nki_moe.kernels`` executed by the project's NumPy NKI emulator;
- ``nki``: the same kernels on the real ``nki`` package (Trainium, or AWS's simulator), the default on Neuron;
- ``auto``: ``nki`` on the Neuron platform or where the real package is importable, else ``torch``.

An op without an NKI kernel yet runs its torch implementation under every backend, and the binding logs that once.
A kernel that exists but cannot take the given shapes says why through its ``supports`` check: under ``auto`` the op
falls back to torch and logs the reason once; under an explicitly chosen backend the reason is raised.
The model never branches on the backend.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F

from . import envs, ops_torch

logger = logging.getLogger(__name__)

OP_NAMES = (
    "rms_norm",
    "fused_add_rms_norm",
    "apply_rope",
    "qk_norm_rope",
    "silu_mul",
    "router_topk",
    "moe_experts",
    "attention_prefill",
    "attention_decode",
)


@dataclass(frozen=True)
class OpSet:
    """The ops of one model: torch-in/torch-out callables with the signatures of ``ops_torch.<name>``, and the
    composite ops (``COMPOSITE_OPS``), built from the others unless a backend has a fused kernel for them."""

    backend: str
    rms_norm: Callable
    fused_add_rms_norm: Callable
    apply_rope: Callable
    qk_norm_rope: Callable  # per-head q/k RMSNorm + RoPE in one call (Qwen3 attention)
    silu_mul: Callable
    router_topk: Callable
    moe_experts: Callable
    attention_prefill: Callable  # writes the paged KV cache in place; vLLM's Attention does this on the CPU path
    attention_decode: Callable
    router_gate_topk: Callable  # composite: see _sequential_router_gate_topk
    moe_block: Callable  # composite: see _sequential_moe_block
    kernel_ops: tuple[str, ...] = ()  # which ops run an NKI kernel under this backend

    def describe(self) -> str:
        kernel_ops = ", ".join(self.kernel_ops) or "none"
        return f"kernels={self.backend} (NKI kernels for: {kernel_ops})"


def resolve_backend(requested: str | None = None) -> str:
    """The backend to bind: ``requested``, else ``VLLM_NKI_MOE_KERNELS``; ``auto`` becomes ``nki`` or ``torch``."""
    backend = envs.kernel_backend() if requested is None else requested
    if backend not in envs.KERNEL_BACKENDS:
        raise ValueError(f"ops: kernels={backend!r}; must be one of {', '.join(envs.KERNEL_BACKENDS)}")
    # Serving on our Neuron platform (platform_neuron built its class in this process; asked without importing it):
    # auto means nki there, and the NumPy emulator cannot run inside the compiled Neuron graph.
    neuron_platform = sys.modules.get("vllm_nki_moe.platform_neuron")
    on_neuron = neuron_platform is not None and neuron_platform.platform_active()
    if backend == "emulator" and on_neuron:
        raise ValueError(
            f"ops: kernels=emulator on the Neuron platform; the NumPy emulator cannot run in the compiled graph, "
            f"set {envs.KERNELS_ENV}=nki (the default there) or torch"
        )
    if backend == "auto":
        from .emulator_bridge import real_nki_available

        backend = "nki" if on_neuron or real_nki_available() else "torch"
    if backend == "nki":
        from .emulator_bridge import real_nki_available

        if not real_nki_available():
            raise RuntimeError(
                f"ops: kernels=nki but the real `nki` package is not importable; install the Neuron SDK's nki "
                f"(AWS's Neuron pip index), or set {envs.KERNELS_ENV}=emulator (NumPy NKI emulator) or torch"
            )
    return backend


def _sequential_router_gate_topk(impls: dict[str, Callable]) -> Callable:
    """The router with its gate matmul: ``router_topk(hidden @ gate_weight.T, top_k, renormalize)``.

    ``router_gate_topk(hidden [T, H], gate_weight [E, H], top_k, renormalize) -> (weights [T, K] fp32,
    ids [T, K] int64)``; a backend with a kernel for the whole (``router_topk_matmul``) runs the gate matmul there.
    """
    router_topk = impls["router_topk"]

    def router_gate_topk(hidden, gate_weight, top_k, renormalize):
        return router_topk(F.linear(hidden, gate_weight), top_k, renormalize)

    return router_gate_topk


def _sequential_moe_block(impls: dict[str, Callable]) -> Callable:
    """The decoder layer's MoE half from the bound ops: residual add + RMSNorm, gate, router, experts.

    ``moe_block(hidden [T, H], residual [T, H], norm_weight [H], eps, gate_weight [E, H], w13 [E, 2I, H],
    w2 [E, H, I], top_k, renormalize) -> (experts' output [T, H], new residual [T, H])``; a backend with a fused
    kernel for it (``moe_block_decode``) uses that where it applies and this sequence elsewhere.
    """
    fused_add_rms_norm, router_gate_topk, moe_experts = (
        impls["fused_add_rms_norm"],
        impls["router_gate_topk"],
        impls["moe_experts"],
    )

    def moe_block(hidden, residual, norm_weight, eps, gate_weight, w13, w2, top_k, renormalize):
        normed, residual = fused_add_rms_norm(hidden, residual, norm_weight, eps)
        topk_weights, topk_ids = router_gate_topk(normed, gate_weight, top_k, renormalize)
        return moe_experts(normed, w13, w2, topk_weights, topk_ids), residual

    return moe_block


# Ops built from the others (see OpSet); a backend's kernel for one runs where it applies, the sequence elsewhere.
_COMPOSITES: dict[str, Callable[[dict[str, Callable]], Callable]] = {
    "router_gate_topk": _sequential_router_gate_topk,
    "moe_block": _sequential_moe_block,
}


def bind(requested: str | None = None, *, host_ops: bool | None = None) -> OpSet:
    """Bind every op for one backend (see module docstring) and log the choice once.

    ``host_ops``: whether the ``torch`` backend may use ``ops_host``'s fast path; default: when the backend comes from
    the environment (``requested`` is None).
    """
    chosen = envs.kernel_backend() if requested is None else requested
    backend = resolve_backend(chosen)
    impls = {name: getattr(ops_torch, name) for name in OP_NAMES}
    if backend == "torch" and (requested is None if host_ops is None else host_ops):
        from . import ops_host

        impls.update(ops_host.host_ops())
    kernel_ops: dict = {}
    # A backend named explicitly (argument or VLLM_NKI_MOE_KERNELS) must run its kernels or say why it cannot.
    strict = chosen != "auto"
    if backend in ("emulator", "nki"):
        from . import ops_nki

        kernel_ops = {op.name: op for op in ops_nki.all_kernel_ops()}
        impls.update({name: kernel_ops[name].bind(backend, strict) for name in OP_NAMES if name in kernel_ops})
        missing = [name for name in OP_NAMES if name not in kernel_ops]
        if missing:
            logger.info("vllm_nki_moe.ops: no NKI kernel yet for %s; those ops run in torch", ", ".join(missing))
    for name, sequence in _COMPOSITES.items():  # in order: each may use the ones before it
        impls[name] = sequence(impls)
        if name in kernel_ops:
            impls[name] = kernel_ops[name].bind(backend, strict, fallback=impls[name])
    names = OP_NAMES + tuple(_COMPOSITES)
    opset = OpSet(backend=backend, kernel_ops=tuple(n for n in names if n in kernel_ops), **impls)
    logger.info("vllm_nki_moe.ops: %s", opset.describe())
    return opset
