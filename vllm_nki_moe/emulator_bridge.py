"""Whether the real NKI package is present (the emulator's own check, which survives PyPI's placeholder ``nki``)."""

from __future__ import annotations


def real_nki_available() -> bool:
    """True when ``import nki`` gives AWS's package rather than nothing, the placeholder, or our emulator."""
    from nki_emulator import is_real_nki

    return is_real_nki()
