"""Whether the real NKI package is present, asked without importing a placeholder that raises on import."""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def real_nki_available() -> bool:
    """True when ``import nki`` gives AWS's package (the PyPI placeholder raises on import; it counts as absent)."""
    try:
        from .emulator import is_real_nki  # the emulator knows how to tell the real package from itself
    except ImportError:
        is_real_nki = None
    if is_real_nki is not None:
        return bool(is_real_nki())
    if importlib.util.find_spec("nki") is None:
        return False
    try:
        import nki  # noqa: F401
    except Exception:  # the PyPI placeholder raises "WRONG PACKAGE"
        return False
    return True
