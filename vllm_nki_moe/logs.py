"""Send this package's log records through vLLM's log handlers, so they appear in `vllm serve`'s output."""

from __future__ import annotations

import logging

PACKAGE_LOGGER = "vllm_nki_moe"


def attach_to_vllm_logging() -> None:
    """Give the ``vllm_nki_moe`` logger vLLM's handlers and level, where no handler listens at the root logger.

    vLLM configures only its own ``vllm`` logger; without this our INFO records (which kernel backend was bound, why
    an op fell back) would reach no handler in a vLLM process.
    """
    ours, theirs = logging.getLogger(PACKAGE_LOGGER), logging.getLogger("vllm")
    if not theirs.handlers or ours.handlers or logging.getLogger().handlers:
        return  # nothing to borrow, done already, or the application listens at the root (our records reach it)
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level or logging.INFO)
