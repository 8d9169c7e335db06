"""Register the emulator as the modules ``nki``, ``nki.language``, ``nki.isa`` (and ``nki.typing``), but only when
the real ``nki`` package cannot be imported, so kernels keep the real import lines and run unchanged on hardware.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np

from . import release
from .release import ENV_VERSION  # noqa: F401 - re-exported (install.ENV_VERSION)

_MODULES = ("nki", "nki.language", "nki.isa", "nki.isa.constants", "nki.typing")
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

    class _MutableTensorType:
        """``nt.mutable_tensor``: marks a kernel argument the kernel writes in place (nki-library router_topk)."""

        def __getitem__(self, shape):
            return self

    mod.tensor = _TensorType()
    mod.mutable_tensor = MUTABLE_TENSOR = _MutableTensorType()
    release.markers["mutable"] = MUTABLE_TENSOR
    mod.__nki_emulator__ = True
    return mod


_proxies: dict[str, types.ModuleType] = {}


def nki_version() -> str:
    """The NKI release the emulator imitates: ``install(nki_version=...)``, else $VLLM_NKI_MOE_NKI_VERSION, else 0.6."""
    return release.nki_version()


def strict() -> bool:
    """Whether language-rule violations raise (a release was chosen explicitly) or only warn (the default 0.6)."""
    return release.strict()


def set_nki_version(version: str | None) -> str:
    """Select the NKI release to imitate (None: $VLLM_NKI_MOE_NKI_VERSION, else the default 0.6, warnings only).

    Returns the release now imitated. Kernels imported earlier see the change (the modules are rebuilt in place)."""
    _select(version)
    return release.nki_version()


def _select(version: str | None) -> None:
    _populate(release.choose(version))


def _hidden(module_key: str, release: str) -> dict[str, str]:
    """Names of the emulator module absent from ``release`` -> why (release notes citation)."""
    from . import language_rules

    out = {}
    for name in language_rules.NAMES.get(module_key, {}):
        ok, source = language_rules.name_available(module_key, name, release)
        if not ok:
            out[name] = source
    return out


def _proxy(public: str, real: types.ModuleType, key: str, release: str) -> types.ModuleType:
    """``nki.language`` / ``nki.isa`` for ``release``: the emulator module's names minus those the release lacks."""
    mod = _proxies.get(public)
    if mod is None:
        mod = types.ModuleType(public)
        _proxies[public] = mod
    hidden = _hidden(key, release)
    keep = {"__name__", "__spec__", "__loader__", "__path__", "__package__"}
    for name in [n for n in mod.__dict__ if n not in keep]:
        del mod.__dict__[name]
    mod.__dict__.update({k: v for k, v in real.__dict__.items() if k not in hidden and k not in keep})
    mod.__name__ = public
    mod.__nki_emulator__ = True
    mod.__nki_release__ = release

    def __getattr__(name: str):
        if name in hidden:
            raise AttributeError(f"{public}.{name}: not in NKI {release} ({hidden[name]})")
        raise AttributeError(f"module {public!r} has no attribute {name!r}")

    mod.__getattr__ = __getattr__
    return mod


def _populate(release: str) -> None:
    """(Re)build the registered modules for ``release`` (in place, so kernels imported earlier see the change)."""
    from . import isa, language, runtime, tensor

    tensor.set_view_methods(release)
    if not _state["installed"]:
        return
    nl = _proxy("nki.language", language, "language", release)
    nisa = _proxy("nki.isa", isa, "isa", release)
    nisa.__path__ = []  # a package: `from nki.isa.constants import oob_mode`
    nisa.constants = sys.modules["nki.isa.constants"]
    nki = sys.modules["nki"]
    nki.language, nki.isa = nl, nisa
    nki.collectives = sys.modules["nki.collectives"]
    nki.jit = runtime.jit
    nki.simulate = runtime.simulate
    sys.modules["nki.language"] = nl
    sys.modules["nki.isa"] = nisa


def _constants_module() -> types.ModuleType:
    """``nki.isa.constants``: the ISA enums (nki-library imports ``from nki.isa.constants import oob_mode``)."""
    from . import isa

    mod = types.ModuleType("nki.isa.constants")
    for name in ("engine", "reduce_cmd", "dge_mode", "oob_mode", "matmul_perf_mode", "nc_version", "dma_engine"):
        setattr(mod, name, getattr(isa, name))
    mod.__nki_emulator__ = True
    return mod


def install(nki_version: str | None = None) -> bool:
    """Install the emulator as ``nki`` unless the real package is importable. Returns True if the emulator is (now)
    the ``nki`` in ``sys.modules``. Idempotent.

    ``nki_version`` ('0.2' to '0.6'; default $VLLM_NKI_MOE_NKI_VERSION, else 0.6) selects the NKI release imitated:
    names the release lacks are absent from ``nki.language`` / ``nki.isa`` / ``NkiTensor``, and ``nki.jit`` kernels
    are checked against its language rules (``language_rules``) when launched. A release chosen explicitly (argument
    or environment) makes violations errors; under the default they are warnings.
    """
    if _state["installed"]:
        if nki_version is not None:
            _select(nki_version)
        return True
    if is_real_nki():
        return False
    from . import collectives, isa, language, runtime

    nki = types.ModuleType("nki")
    nki.__doc__ = "nki_emulator registered as nki (the real Neuron SDK package is not importable)."
    nki.__path__ = []  # a package, so `import nki.language` resolves through sys.modules
    nki.__nki_emulator__ = True
    nki.jit = runtime.jit
    nki.simulate = runtime.simulate
    nki.language = language
    nki.isa = isa
    nki.typing = _typing_module()
    nki.dtype = np.dtype  # `nki.dtype` annotations (nki-library); every NKI dtype is a numpy.dtype here
    sys.modules["nki"] = nki
    sys.modules["nki.typing"] = nki.typing
    nki.collectives = collectives
    collectives.__nki_emulator__ = True
    sys.modules["nki.collectives"] = collectives
    sys.modules["nki.isa.constants"] = _constants_module()
    language.__nki_emulator__ = True
    isa.__nki_emulator__ = True
    _state["installed"] = True
    _select(nki_version)
    return True
