"""How an op declares itself: one signature (its reference), and optionally a host fast path and an NKI kernel.

Each op family module (``norms``, ``rope``, ``router``, ``moe``, ``attention``) lists its ops as :class:`OpSpec`:

- ``reference``: the op itself, plain PyTorch; its signature is the op's signature, and every other implementation
  takes exactly the same arguments;
- ``host``: the same function on vLLM's CPU C++ ops (``ops.host``), for the ``torch`` backend where they are loaded;
- ``kernel``: the NKI implementation, ``run(backend, *args)``, and ``supports(*args) -> reason | None``, which says
  (naming the limit and the value) when the kernel cannot take the arguments;
- ``traceable``: whether ``reference`` traces as graph ops (no host syncs, no data-dependent shapes, no in-place
  writes to its arguments); such an op, when no kernel is bound for it, is traced inline under ``torch.compile``
  (``ops.bind``), the others stay one opaque custom op;
- ``weights``: for an op whose fast implementations read their weight arguments in another layout (the experts:
  the kernels' tiles, ``cpu_fused_moe``'s prepacked blocks), how the model converts those weights once, in place, at
  load (so one copy is kept), and the torch implementation that reads any of those layouts (a kernel's fallback);
- ``compose``: for a composite op (a fused kernel for something other ops do in sequence), how to build the sequence
  from the bound ops; where the fused kernel does not apply the sequence runs, under any backend, and that is not an
  error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelImpl:
    """An op implemented by NKI kernel(s): ``run(backend, *args)`` and the ``supports(*args)`` check."""

    run: Callable[..., Any]
    supports: Callable[..., str | None]


@dataclass(frozen=True)
class WeightLayouts:
    """How an op's implementations want its weights (see ``OpSpec.weights``): ``for_host(*weights)`` and
    ``for_kernel(*weights)`` convert in place (or leave weights the implementation cannot take as they are);
    ``any_layout`` is the op's torch implementation for weights in the model's layout or either converted one (None:
    the op's own torch implementation reads every layout)."""

    for_host: Callable[..., None]
    for_kernel: Callable[..., None]
    any_layout: Callable[..., Any] | None = None


@dataclass(frozen=True)
class OpSpec:
    name: str
    reference: Callable | None = None
    host: Callable | None = None
    kernel: KernelImpl | None = None
    compose: Callable[[dict[str, Callable]], Callable] | None = None
    traceable: bool = True
    weights: WeightLayouts | None = None

    @property
    def composite(self) -> bool:
        return self.compose is not None

    def bind_kernel(self, backend: str, strict: bool, fallback: Callable) -> Callable:
        """The op for ``backend``: the kernel where it supports the arguments, else ``fallback`` (logged once per
        reason) unless ``strict`` (an explicitly chosen backend) and the op is not composite: then the reason is
        raised as ``ValueError("<op>: <reason>")``."""
        kernel = self.kernel
        reported: set[str] = set()

        def call(*args, **kwargs):
            reason = kernel.supports(*args, **kwargs)
            if reason is None:
                return kernel.run(backend, *args, **kwargs)
            if strict and not self.composite:
                raise ValueError(f"{self.name}: {reason}")
            if reason not in reported:
                reported.add(reason)
                how = "as separate ops" if self.composite else "in torch"
                logger.info("vllm_nki_moe.ops: %s runs %s here: %s", self.name, how, reason)
            return fallback(*args, **kwargs)

        return call
