"""Calling an NKI kernel from torch code: the backend switch and the shape-support fallback."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from .. import ops_torch

logger = logging.getLogger(__name__)


def call_kernel(backend: str, kernel, *args: Any, **kwargs: Any):
    """Run ``kernel`` (an ``@nki.jit`` function) on ``args``; tensors in and out are torch tensors.

    ``emulator``: the emulator's ``nki.simulate`` (CPU tensors); ``nki``: the real package takes device tensors.
    Non-tensor arguments pass unchanged. Returns what the kernel returns, as torch tensors.
    """
    if backend == "nki":
        return kernel(*args, **kwargs)
    from ..emulator import simulate  # takes torch tensors (bf16 included) and returns torch tensors

    return simulate(kernel)(*args, **kwargs)


@dataclass(frozen=True)
class KernelOp:
    """One op of ``ops.OpSet`` implemented by NKI kernel(s).

    ``run(backend, *args)`` computes the op through its kernel(s) with the torch signature of ``ops_torch.<name>``;
    ``supports(*args)`` returns None, or the reason (a limit and the value that broke it) the kernel cannot take
    these arguments.
    """

    name: str
    run: Callable[..., Any]
    supports: Callable[..., str | None] = lambda *args, **kwargs: None

    def bind(self, backend: str, strict: bool) -> Callable:
        fallback = getattr(ops_torch, self.name)
        reported: set[str] = set()

        def call(*args, **kwargs):
            reason = self.supports(*args, **kwargs)
            if reason is None:
                return self.run(backend, *args, **kwargs)
            if strict:
                raise ValueError(f"{self.name}: {reason}")
            if reason not in reported:
                reported.add(reason)
                logger.info("vllm_nki_moe.ops: %s runs in torch here: %s", self.name, reason)
            return fallback(*args, **kwargs)

        return call
