"""Calling an NKI kernel from torch code: the backend switch and the shape-support fallback."""

from __future__ import annotations

import functools
import importlib
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import ops_torch

logger = logging.getLogger(__name__)


# Where vLLM Neuron's NKI higher-order-operator wrapper lives: it moved between releases (docs/neuron.md section 4).
# Only wrapped kernels are visible to the torch.compile tracing upstream's runner compiles every graph with.
WRAP_NKI_MODULES = ("libtorch_neuronx_lite.nki.nki_hop", "vllm_neuron.nki.nki_hop", "torch_neuronx")


@functools.cache
def _wrap_nki() -> Callable | None:
    for module in WRAP_NKI_MODULES:
        try:
            return importlib.import_module(module).wrap_nki
        except (ImportError, AttributeError):
            continue
    logger.warning(
        "vllm_nki_moe.ops: no wrap_nki in %s; NKI kernels are called directly (fine for the nki simulator or eager "
        "runs, invisible to torch.compile)",
        ", ".join(WRAP_NKI_MODULES),
    )
    return None


@functools.cache
def _device_caller(kernel) -> Callable:
    """The kernel as the device path calls it: through ``wrap_nki`` once per kernel when that exists."""
    wrap = _wrap_nki()
    return kernel if wrap is None else wrap(kernel)


def call_kernel(backend: str, kernel, *args: Any, **kwargs: Any):
    """Run ``kernel`` (an ``@nki.jit`` function) on ``args``; tensors in and out are torch tensors.

    ``emulator``: the emulator's ``nki.simulate`` (CPU tensors); ``nki``: the real package on device tensors, through
    vLLM Neuron's ``wrap_nki`` where it is installed (one program: our kernels do not use an LNC=2 grid yet).
    Non-tensor arguments pass unchanged. Returns what the kernel returns, as torch tensors.
    """
    if backend == "nki":
        return _device_caller(kernel)(*args, **kwargs)
    from nki_emulator import simulate  # takes torch tensors (bf16 included) and returns torch tensors

    return simulate(kernel)(*args, **kwargs)


class KernelWeights:
    """Kernel-layout copies of weight tensors, keyed by the source tensor's identity and contents' version.

    A cached copy is reused while the source is the same live tensor (same storage pointer, shape, dtype) with the
    same ``_version`` and the same sampled values (a 64-element fingerprint catches in-place reloads through
    ``.data``, which do not bump ``_version``). Entries die with their source tensor.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple] = {}

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        return (t.data_ptr(), tuple(t.shape), t.dtype, t._version, flat[::step][:64].float().sum().item())

    def get(self, convert, *tensors: torch.Tensor):
        """``convert(*tensors)``, computed once per live first tensor and version of the contents."""
        first = tensors[0]
        key = tuple(self._key(t) for t in tensors)
        slot = self._cache.get((id(first), convert))
        if slot is not None and slot[0] == key and slot[1]() is first:
            return slot[2]
        converted = convert(*(t.detach() for t in tensors))
        self._cache[(id(first), convert)] = (key, weakref.ref(first), converted)
        weakref.finalize(first, self._cache.pop, (id(first), convert), None)
        return converted


@dataclass(frozen=True)
class KernelOp:
    """One op of ``ops.OpSet`` implemented by NKI kernel(s).

    ``run(backend, *args)`` computes the op through its kernel(s) with the torch signature of the op;
    ``supports(*args)`` returns None, or the reason (a limit and the value that broke it) the kernel cannot take
    these arguments. A ``composite`` op is a fused kernel for something the other ops can also do in sequence
    (``moe_block``): where it does not apply, the sequence runs, under any backend, and that is not an error.
    """

    name: str
    run: Callable[..., Any]
    supports: Callable[..., str | None] = lambda *args, **kwargs: None
    composite: bool = False

    def bind(self, backend: str, strict: bool, fallback: Callable | None = None) -> Callable:
        """The op for ``backend``; ``fallback`` (default ``ops_torch.<name>``) runs where the kernel cannot."""
        fallback = fallback or getattr(ops_torch, self.name)
        reported: set[str] = set()

        def call(*args, **kwargs):
            reason = self.supports(*args, **kwargs)
            if reason is None:
                return self.run(backend, *args, **kwargs)
            if strict and not self.composite:
                raise ValueError(f"{self.name}: {reason}")
            if reason not in reported:
                reported.add(reason)
                how = "as separate ops" if self.composite else "in torch"
                logger.info("vllm_nki_moe.ops: %s runs %s here: %s", self.name, how, reason)
            return fallback(*args, **kwargs)

        return call
