"""Shared fixtures for kernel tests: the emulator registered as ``nki`` before kernel modules import it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nki_emulator as emulator

emulator.install()  # kernels do `import nki`; collected test modules import them at module level

SEED = 0


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


def randn(rng: np.random.Generator, shape, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Seeded standard-normal torch tensor in ``dtype`` (drawn in fp32, then rounded)."""
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * scale).to(dtype)
