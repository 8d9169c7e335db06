"""The ``emulator`` and ``nki`` backends of ``vllm_nki_moe.ops``: torch-facing wrappers around the NKI kernels.

One module per kernel family (``norms``, ``router``, ``moe``, ``attention``...), each exposing
``kernel_ops() -> list[KernelOp]``. A family whose kernels have not landed yet exposes nothing, and its ops run in
torch (``ops.bind`` logs which). Only this package (through ``ops``) imports ``vllm_nki_moe.kernels``.
"""

from __future__ import annotations

import importlib

from .bridge import KernelOp

# Families in the order the model runs them; a missing module is a family not written yet.
FAMILY_MODULES = ("norms", "rope", "router", "moe", "attention")


def all_kernel_ops() -> list[KernelOp]:
    found: list[KernelOp] = []
    for family in FAMILY_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{family}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{family}":
                raise
            continue
        found.extend(module.kernel_ops())
    return found
