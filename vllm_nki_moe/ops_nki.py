"""The ``emulator`` and ``nki`` backends of ``vllm_nki_moe.ops``: torch-facing wrappers around the NKI kernels.

Each wrapper converts torch tensors to what the kernel takes (NumPy arrays for the emulator's ``nki.simulate``,
device tensors for the real ``nki``), calls the kernel, and converts back. Kernels land family by family; an op
with no wrapper here runs in torch (``ops.bind`` logs which).
"""

from __future__ import annotations

from typing import Callable


def kernel_impls(backend: str, strict: bool) -> dict[str, Callable]:
    """The ops that have an NKI kernel, wrapped for ``backend`` (``emulator`` or ``nki``)."""
    return {}
