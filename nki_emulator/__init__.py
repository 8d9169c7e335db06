"""A strict NumPy emulator of the NKI API (``nki``, ``nki.language``, ``nki.isa``) with a trn2 cost model.

Public API:
    install(nki_version=None)   register as ``nki`` unless the real package is importable (idempotent); the NKI
                                release to imitate ('0.2'..'0.6', default $VLLM_NKI_MOE_NKI_VERSION or 0.6)
    set_nki_version(v), nki_version()   switch / read the imitated release
    language_rules              check(fn, version) -> [Violation], oldest_release(fn) -> str | None
    is_real_nki() -> bool       whether ``import nki`` is the real Neuron SDK package
    run(kernel, *args, **kw)    -> (outputs, CostReport)
    run_ranks(kernel, args_per_rank)   one launch per rank, concurrently (``nki.collectives`` meet across them)
    solo_rank(n)                context: launches run as rank 0 of n ranks (collectives costed for n)
    jit, simulate               the ``nki.jit`` / ``nki.simulate`` entry points
    language, isa               the ``nki.language`` / ``nki.isa`` modules
    NkiEmulatorError            raised for every rule violation (a ValueError)
See docs/emulator.md.
"""

from . import isa, language, language_rules
from .collectives import solo_rank
from .cost import CostReport
from .errors import NkiEmulatorError
from .install import install, is_real_nki, nki_version, set_nki_version
from .runtime import Kernel, NkiLanguageWarning, jit, run, run_ranks, simulate

__all__ = [
    "CostReport",
    "Kernel",
    "NkiEmulatorError",
    "NkiLanguageWarning",
    "install",
    "is_real_nki",
    "isa",
    "jit",
    "language",
    "language_rules",
    "nki_version",
    "run",
    "run_ranks",
    "set_nki_version",
    "simulate",
    "solo_rank",
]
