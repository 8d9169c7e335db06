"""The one dispatch point between the model and its kernels.

Every op the Qwen3-MoE model runs outside vLLM's own layers goes through an :class:`OpSet`, bound once per model by
:func:`bind` from ``VLLM_NKI_MOE_KERNELS``. Each op is declared once, in its family module (``norms``, ``rope``,
``router``, ``moe``, ``attention``; see ``spec.OpSpec``): its reference (the signature), a vLLM-CPU fast path, an NKI
kernel with its ``supports`` check. The backends:

- ``torch``: PyTorch, the default off Neuron. Bound from the environment (``bind()``, as the model does) where vLLM's
  CPU custom ops are loaded (serving on a vLLM CPU build), the norms, RoPE, SiLU and experts run them (``host``:
  same functions, C++ rounding, prepacked fused MoE); elsewhere, with ``VLLM_NKI_MOE_HOST_OPS=off``, or named in
  code (``bind("torch")``: the baseline tests and tools compare against), every op is its plain Hugging Face-exact
  reference; ``bind(..., host_ops=True|False)`` chooses explicitly;
- ``emulator``: the NKI kernels in ``vllm_nki_moe.kernels`` executed by the project's NumPy NKI emulator;
- ``nki``: the same kernels on the real ``nki`` package (Trainium, or AWS's simulator), the default on Neuron;
- ``auto``: ``nki`` on the Neuron platform or where the real package is importable, else ``torch``.

An op without an NKI kernel yet runs its torch implementation under every backend, and the binding logs that once.
A kernel that exists but cannot take the given shapes says why through its ``supports`` check: under ``auto`` the op
falls back to torch and logs the reason once; under an explicitly chosen backend the reason is raised.
The model never branches on the backend.

Under ``torch.compile`` (vLLM's ``@support_torch_compile`` on CPU, the Neuron runner's per-bucket compile) an op is
one of two things. An op bound to a kernel, or whose reference cannot be traced (``OpSpec.traceable``: the experts'
host loop, the attention ops' in-place cache writes), is its registered torch custom op (``torch.ops.nki_moe.<op>``,
``custom_ops``): one opaque node whatever runs inside. Any other op is traced inline as its reference, so the
compiler fuses it with its neighbours; this is vLLM's own rule for its CPU custom ops, which are disabled under
Inductor so that Inductor generates fused code from their native forward (``CompilationConfig.custom_ops``,
vllm/config/compilation.py). Outside a trace every op calls its implementation directly: a custom op's dispatch
costs tens of microseconds per call, which eager execution does not need (vLLM's ``ir_enable_torch_wrap``, same
file, makes the same choice).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from vllm_nki_moe import envs
from vllm_nki_moe.ops import (
    attention,
    attention_block,
    custom_ops,
    decoder_layers,
    fp8,
    host,
    kernel_call,
    linear,
    moe,
    norms,
    rope,
    router,
)
from vllm_nki_moe.ops.spec import OpSpec

logger = logging.getLogger(__name__)

FAMILIES = (norms, linear, rope, router, moe, fp8, attention, attention_block, decoder_layers)
SPECS: dict[str, OpSpec] = {spec.name: spec for family in FAMILIES for spec in family.SPECS}
# The ops in the order a decoder layer runs them.
OP_NAMES = (
    "rms_norm",
    "fused_add_rms_norm",
    "linear",
    "linear_fp8",
    "apply_rope",
    "qk_norm_rope",
    "silu_mul",
    "router_topk",
    "moe_experts",
    "moe_experts_fp8",
    "attention_prefill",
    "attention_decode",
)
# Ops built from the others, in order (each may use the ones before it); a kernel for one runs where it applies.
COMPOSITE_OPS = (
    "router_gate_topk",
    "moe_block",
    "moe_block_fp8",
    "attention_block",
    "attention_block_fp8",
    "decoder_layers_fp8",
)
assert set(SPECS) == set(OP_NAMES + COMPOSITE_OPS), sorted(SPECS)
# The ops with a vLLM-CPU fast path (``ops.host``) and those implementations.
HOST_FAST_OPS: dict[str, Callable] = {name: spec.host for name, spec in SPECS.items() if spec.host is not None}


@dataclass(frozen=True)
class OpSet:
    """The ops of one model: torch-in/torch-out callables with the signatures of the family modules' references, and
    the composite ops (``COMPOSITE_OPS``), built from the others unless a backend has a fused kernel for them."""

    backend: str
    rms_norm: Callable
    fused_add_rms_norm: Callable
    linear: Callable  # x @ W^T: vLLM's linear layers route their matmul here under kernel backends
    linear_fp8: Callable  # x @ W^T with a block-scaled FP8 W (FP8 checkpoints; ops.fp8)
    apply_rope: Callable
    qk_norm_rope: Callable  # per-head q/k RMSNorm + RoPE in one call (Qwen3 attention)
    silu_mul: Callable
    router_topk: Callable
    moe_experts: Callable
    moe_experts_fp8: Callable  # moe_experts with block-scaled FP8 experts (ops.fp8)
    attention_prefill: Callable  # writes the paged KV cache in place; vLLM's Attention does this on the CPU path
    attention_decode: Callable
    router_gate_topk: Callable  # composite: see router.router_gate_topk_sequence
    moe_block: Callable  # composite: see moe.moe_block_sequence
    moe_block_fp8: Callable  # composite: see fp8.moe_block_fp8_sequence
    attention_block: Callable  # composite: see attention_block.attention_block_sequence (decode, paged cache)
    attention_block_fp8: Callable  # composite: the same with FP8 projections
    decoder_layers_fp8: Callable  # composite: decode steps' FP8 layers with their all-reduces (ops.decoder_layers)
    kernel_ops: tuple[str, ...] = ()  # which ops run an NKI kernel under this backend
    # op name -> the in-place conversion of its weights to the layout its bound implementation reads (OpSpec.weights)
    weight_preparers: dict[str, Callable] = field(default_factory=dict, repr=False, compare=False)
    # What each op's custom op runs in this binding (reference, *_host, or the kernel binding): for inspection.
    implementations: dict[str, Callable] = field(default_factory=dict, repr=False, compare=False)
    binding: str = ""  # the key the custom ops take (``torch.ops.nki_moe.<op>(*args, binding)``)

    def prepare_weights(self, op: str, *weights) -> None:
        """Convert ``op``'s weight arguments in place, once after loading, to the layout its bound implementation
        reads (the model then keeps that one copy); nothing for an op whose implementation reads the model's."""
        preparer = self.weight_preparers.get(op)
        if preparer is not None:
            preparer(*weights)

    def describe(self) -> str:
        kernel_ops = ", ".join(self.kernel_ops) or "none"
        return f"kernels={self.backend} (NKI kernels for: {kernel_ops})"


def resolve_backend(requested: str | None = None) -> str:
    """The backend to bind: ``requested``, else ``VLLM_NKI_MOE_KERNELS``; ``auto`` becomes ``nki`` or ``torch``."""
    backend = envs.kernel_backend() if requested is None else requested
    if backend not in envs.KERNEL_BACKENDS:
        raise ValueError(f"ops: kernels={backend!r}; must be one of {', '.join(envs.KERNEL_BACKENDS)}")
    # Serving on our Neuron platform (platforms.neuron built its class in this process; asked without importing it):
    # auto means nki there, and the NumPy emulator cannot run inside the compiled Neuron graph.
    neuron_platform = sys.modules.get("vllm_nki_moe.platforms.neuron")
    on_neuron = neuron_platform is not None and neuron_platform.platform_active()
    if backend == "emulator" and on_neuron:
        raise ValueError(
            f"ops: kernels=emulator on the Neuron platform; the NumPy emulator cannot run in the compiled graph, "
            f"set {envs.KERNELS_ENV}=nki (the default there) or torch"
        )
    if backend == "auto":
        backend = "nki" if on_neuron or kernel_call.real_nki_available() else "torch"
    if backend == "nki" and not kernel_call.real_nki_available():
        raise RuntimeError(
            f"ops: kernels=nki but the real `nki` package is not importable; install the Neuron SDK's nki "
            f"(AWS's Neuron pip index), or set {envs.KERNELS_ENV}=emulator (NumPy NKI emulator) or torch"
        )
    return backend


def host_fast_ops() -> dict[str, Callable]:
    """The ops of the ``torch`` backend that have a vLLM-CPU fast path (``ops.host``): empty, with the reason logged
    once, when the fast path is unavailable in this process."""
    reason = host.unavailable_reason()
    if reason is not None:
        host.log_once(f"plain torch ops (the references): {reason}")
        return {}
    host.log_once(
        f"vLLM CPU custom ops for {', '.join(HOST_FAST_OPS)} (set {envs.HOST_OPS_ENV}=off for the plain reference)"
    )
    return dict(HOST_FAST_OPS)


def bind(requested: str | None = None, *, host_ops: bool | None = None) -> OpSet:
    """Bind every op for one backend (see module docstring) and log the choice once.

    ``host_ops``: whether the ``torch`` backend may use the vLLM-CPU fast path; default: when the backend comes from
    the environment (``requested`` is None).
    """
    chosen = envs.kernel_backend() if requested is None else requested
    backend = resolve_backend(chosen)
    impls = {name: SPECS[name].reference for name in OP_NAMES}
    preparers: dict[str, Callable] = {}
    if backend == "torch" and (requested is None if host_ops is None else host_ops):
        host_impls = host_fast_ops()
        impls.update(host_impls)
        preparers = {n: SPECS[n].weights.for_host for n in host_impls if SPECS[n].weights}
    # A backend named explicitly (argument or VLLM_NKI_MOE_KERNELS) must run its kernels or say why it cannot.
    strict = chosen != "auto"
    with_kernels = backend in ("emulator", "nki")
    if with_kernels:
        for name in OP_NAMES:
            spec = SPECS[name]
            if spec.kernel is not None:
                fallback = spec.weights.any_layout if spec.weights and spec.weights.any_layout else impls[name]
                impls[name] = spec.bind_kernel(backend, strict, fallback=fallback)
                if spec.weights:
                    preparers[name] = spec.weights.for_kernel
        missing = [name for name in OP_NAMES if SPECS[name].kernel is None]
        if missing:
            logger.info("vllm_nki_moe.ops: no NKI kernel yet for %s; those ops run in torch", ", ".join(missing))
    for name in COMPOSITE_OPS:
        spec = SPECS[name]
        impls[name] = spec.compose(impls)
        if with_kernels and spec.kernel is not None:
            impls[name] = spec.bind_kernel(backend, strict, fallback=impls[name])
            if spec.weights:
                preparers[name] = spec.weights.for_kernel
    names = OP_NAMES + COMPOSITE_OPS
    kernel_ops = tuple(n for n in names if with_kernels and SPECS[n].kernel is not None)
    signatures = {name: SPECS[name].reference for name in OP_NAMES}
    for name in COMPOSITE_OPS:  # a composite's signature is its sequence's
        signatures[name] = SPECS[name].compose(signatures)
    key, custom = custom_ops.register(impls, signatures)
    traced = {
        name: SPECS[name].reference if SPECS[name].traceable and name not in kernel_ops else custom[name]
        for name in OP_NAMES
    }
    for name in COMPOSITE_OPS:  # a composite without its kernel is the sequence of the traced ops
        traced[name] = custom[name] if name in kernel_ops else SPECS[name].compose(traced)
    callers = {name: _eager_or_traced(impls[name], traced[name]) for name in names}
    opset = OpSet(
        backend=backend,
        kernel_ops=kernel_ops,
        weight_preparers=preparers,
        implementations=impls,
        binding=key,
        **callers,
    )
    logger.info("vllm_nki_moe.ops: %s", opset.describe())
    return opset


def _eager_or_traced(eager: Callable, traced: Callable) -> Callable:
    """The op as the model calls it: ``traced`` while ``torch.compile`` traces (Dynamo reads ``is_compiling()`` as
    a constant), ``eager`` otherwise (module docstring)."""

    def call(*args):
        if torch.compiler.is_compiling():
            return traced(*args)
        return eager(*args)

    return call
