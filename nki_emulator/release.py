"""Which NKI release the emulator imitates and whether its language rules are errors: state only.

``install`` chooses the release (``install(nki_version=...)``, ``set_nki_version``) and rebuilds the ``nki`` modules
for it; ``runtime`` reads the choice here, so neither imports the other.
"""

from __future__ import annotations

import os

from . import language_rules

ENV_VERSION = "VLLM_NKI_MOE_NKI_VERSION"  # which NKI release the emulator imitates (language_rules.RELEASES)

_chosen = {"release": None, "strict": False}
# nt.mutable_tensor's marker object, once install() has built nki.typing (runtime recognises annotated arguments).
markers = {"mutable": None}


def resolve(version: str | None) -> tuple[str, bool]:
    """(release, strict) for ``version``, else $VLLM_NKI_MOE_NKI_VERSION, else the default release (warnings only)."""
    chosen = version if version is not None else os.environ.get(ENV_VERSION) or None
    release = language_rules.normalize_release(chosen if chosen else language_rules.DEFAULT_RELEASE)
    return release, chosen is not None


def choose(version: str | None) -> str:
    _chosen["release"], _chosen["strict"] = resolve(version)
    return _chosen["release"]


def nki_version() -> str:
    """The NKI release the emulator imitates: ``install(nki_version=...)``, else $VLLM_NKI_MOE_NKI_VERSION, else 0.6."""
    if _chosen["release"] is None:
        choose(None)
    return _chosen["release"]


def strict() -> bool:
    """Whether language-rule violations raise (a release was chosen explicitly) or only warn (the default 0.6)."""
    if _chosen["release"] is None:
        choose(None)
    return _chosen["strict"]
