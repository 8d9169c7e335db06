"""A strict NumPy emulator of the NKI API (``nki``, ``nki.language``, ``nki.isa``) with a trn2 cost model.

Public API:
    install() -> bool           register as ``nki`` unless the real package is importable (idempotent)
    is_real_nki() -> bool       whether ``import nki`` is the real Neuron SDK package
    run(kernel, *args, **kw)    -> (outputs, CostReport)
    jit, simulate               the ``nki.jit`` / ``nki.simulate`` entry points
    language, isa               the ``nki.language`` / ``nki.isa`` modules
    NkiEmulatorError            raised for every rule violation (a ValueError)
See docs/emulator.md.
"""

from . import isa, language
from .cost import CostReport
from .errors import NkiEmulatorError
from .install import install, is_real_nki
from .runtime import Kernel, jit, run, simulate

__all__ = [
    "CostReport",
    "Kernel",
    "NkiEmulatorError",
    "install",
    "is_real_nki",
    "isa",
    "jit",
    "language",
    "run",
    "simulate",
]
