"""Calling an NKI kernel from torch code, under the ``emulator`` or the ``nki`` backend.

The only place the host side meets ``vllm_nki_moe.kernels``: :func:`load_kernels` imports a kernel module (after
registering our emulator as ``nki`` where the real package is absent), :func:`call_kernel` runs a kernel.
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType
from typing import Any, Callable

logger = logging.getLogger(__name__)


# Where vLLM Neuron's NKI higher-order-operator wrapper lives: it moved between releases (docs/neuron.md section 4).
# Only wrapped kernels are visible to the torch.compile tracing upstream's runner compiles every graph with.
WRAP_NKI_MODULES = ("libtorch_neuronx_lite.nki.nki_hop", "vllm_neuron.nki.nki_hop", "torch_neuronx")


def real_nki_available() -> bool:
    """True when ``import nki`` gives AWS's package rather than nothing, PyPI's placeholder, or our emulator."""
    from nki_emulator import is_real_nki

    return is_real_nki()


def load_kernels(name: str) -> ModuleType:
    """``vllm_nki_moe.kernels.<name>``, with ``import nki`` answered by the emulator unless the real package imports.

    A missing module raises ``ModuleNotFoundError``: a kernel file that is renamed or gone is an error under the
    backend that asked for it, never a silent fall back to torch.
    """
    from nki_emulator import install

    install()  # a no-op when the real nki is importable
    return importlib.import_module(f"vllm_nki_moe.kernels.{name}")


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


def launch_grid(backend: str) -> int:
    """Programs per launch of a kernel written for a grid: one per physical core of the logical core
    (``NEURON_LOGICAL_NC_CONFIG``; on the device 2, trn2's default, when unset; in the emulator 1 unless set)."""
    from vllm_nki_moe import envs

    return envs.logical_nc(default=2) if backend == "nki" else envs.logical_nc()


def call_kernel(backend: str, kernel, *args: Any, grid: int = 1, **kwargs: Any):
    """Run ``kernel`` (an ``@nki.jit`` function) on ``args``; tensors in and out are torch tensors.

    ``emulator``: the emulator's ``nki.simulate`` (CPU tensors); ``nki``: the real package on device tensors, through
    vLLM Neuron's ``wrap_nki`` where it is installed. ``grid`` > 1 launches that many programs (a kernel written for
    one, e.g. LNC=2: ``caller[grid](...)``, the launch form of upstream's NKI operator). Non-tensor arguments pass
    unchanged. Returns what the kernel returns, as torch tensors.
    """
    if backend == "nki":
        caller = _device_caller(kernel)
        return (caller[grid] if grid > 1 else caller)(*args, **kwargs)
    from nki_emulator import simulate  # takes torch tensors (bf16 included) and returns torch tensors

    return simulate(kernel[grid] if grid > 1 else kernel)(*args, **kwargs)
