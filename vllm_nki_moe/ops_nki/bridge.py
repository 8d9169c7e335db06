"""Calling an NKI kernel from torch code: tensor conversion, the backend switch, and the shape-support fallback."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import ml_dtypes
import numpy as np
import torch

from .. import ops_torch

logger = logging.getLogger(__name__)

_TORCH_TO_NUMPY = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.uint8: np.uint8,
    torch.int8: np.int8,
}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A contiguous NumPy copy of ``t``; bf16/fp8 arrive as ``ml_dtypes`` arrays with the same bits."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    if t.dtype == torch.float8_e5m2:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e5m2)
    if t.dtype not in _TORCH_TO_NUMPY:
        raise TypeError(f"ops_nki: dtype={t.dtype} has no NumPy equivalent for the emulator")
    return t.numpy().copy()


def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    if a.dtype == ml_dtypes.float8_e4m3fn:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint8)).view(torch.float8_e4m3fn)
    if a.dtype == ml_dtypes.float8_e5m2:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.uint8)).view(torch.float8_e5m2)
    return torch.from_numpy(np.ascontiguousarray(a))


def call_kernel(backend: str, kernel, *args: Any, **kwargs: Any):
    """Run ``kernel`` (an ``@nki.jit`` function) on ``args``; tensors in and out are torch tensors.

    ``emulator``: tensors become NumPy arrays for the emulator's ``nki.simulate``; ``nki``: the real package takes
    device tensors directly. Non-tensor arguments pass unchanged. Returns a tensor or a tuple of tensors.
    """
    if backend == "nki":
        return kernel(*args, **kwargs)
    from ..emulator import simulate

    def convert(x):
        return to_numpy(x) if isinstance(x, torch.Tensor) else x

    out = simulate(kernel)(*(convert(a) for a in args), **{k: convert(v) for k, v in kwargs.items()})
    if isinstance(out, (tuple, list)):
        return tuple(to_torch(o) for o in out)
    return to_torch(out)


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
