"""Register the emulator as the modules ``nki``, ``nki.language``, ``nki.isa`` (and ``nki.typing``), but only when
the real ``nki`` package cannot be imported, so kernels keep the real import lines and run unchanged on hardware.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

_MODULES = ("nki", "nki.language", "nki.isa", "nki.typing")
_state = {"installed": False, "real": None}


def _real_nki_importable() -> bool:
    """True when an ``nki`` other than ours imports and looks like the SDK (has ``jit`` and ``language``).

    PyPI's placeholder ``nki`` 0.0.1 raises on import ("WRONG PACKAGE"); any exception (even SystemExit) counts as
    not importable, and a half-imported module is removed from ``sys.modules``.
    """
    existing = sys.modules.get("nki")
    if existing is not None:
        if getattr(existing, "__nki_emulator__", False):
            return False
        return hasattr(existing, "jit") and hasattr(existing, "language")
    try:
        if importlib.util.find_spec("nki") is None:
            return False
        mod = importlib.import_module("nki")
        ok = hasattr(mod, "jit") and hasattr(mod, "language")
    except BaseException:  # noqa: BLE001 - the placeholder may raise anything, including SystemExit
        ok = False
    if not ok:
        for name in [m for m in sys.modules if m == "nki" or m.startswith("nki.")]:
            del sys.modules[name]
    return ok


def is_real_nki() -> bool:
    """True when ``import nki`` gives the real Neuron SDK package (then the emulator is not installed)."""
    if _state["real"] is None:
        _state["real"] = _real_nki_importable()
    return bool(_state["real"])


def _typing_module() -> types.ModuleType:
    """``nki.typing``: ``nt.tensor[128, 512]`` annotations; subscripting returns the shape, which is not checked."""
    mod = types.ModuleType("nki.typing")

    class _TensorType:
        def __getitem__(self, shape):
            return shape

    mod.tensor = _TensorType()
    mod.__nki_emulator__ = True
    return mod


def install() -> bool:
    """Install the emulator as ``nki`` unless the real package is importable. Returns True if the emulator is (now)
    the ``nki`` in ``sys.modules``. Idempotent."""
    if _state["installed"]:
        return True
    if is_real_nki():
        return False
    from . import isa, language, runtime

    nki = types.ModuleType("nki")
    nki.__doc__ = "nki_emulator registered as nki (the real Neuron SDK package is not importable)."
    nki.__path__ = []  # a package, so `import nki.language` resolves through sys.modules
    nki.__nki_emulator__ = True
    nki.jit = runtime.jit
    nki.simulate = runtime.simulate
    nki.language = language
    nki.isa = isa
    nki.typing = _typing_module()
    sys.modules["nki"] = nki
    sys.modules["nki.language"] = language
    sys.modules["nki.isa"] = isa
    sys.modules["nki.typing"] = nki.typing
    language.__nki_emulator__ = True
    isa.__nki_emulator__ = True
    _state["installed"] = True
    return True
