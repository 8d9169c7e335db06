"""The one cache of weights in another layout (a kernel's, or a C++ op's prepacked one), per live source tensor.

Converting per call would move whole weight tensors every layer of every step (hundreds of MB of experts at
Qwen3-30B-A3B sizes), so each conversion is made once and reused while its sources are unchanged: the same live
tensors (identity, storage pointer, shape, dtype) with the same version counter and, when ``fingerprint`` is on, the
same sampled values (a 64-element fingerprint catches in-place reloads through ``.data``, which bump no version).
Entries die with their first source tensor.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch

FINGERPRINT_SAMPLES = 64


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot change outside inference mode)
        return -1


def _key(t: torch.Tensor, fingerprint: bool) -> tuple:
    key = (t.data_ptr(), tuple(t.shape), t.dtype, _version(t))
    if not fingerprint:
        return key
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
    return (*key, flat[::step][:FINGERPRINT_SAMPLES].float().sum().item())


class WeightCache:
    """``convert(*tensors)`` computed once per live first tensor and per state of all of them (module docstring)."""

    def __init__(self, *, fingerprint: bool = True) -> None:
        self._fingerprint = fingerprint
        self._cache: dict[tuple, tuple] = {}

    def get(self, convert: Callable, *tensors: torch.Tensor):
        first = tensors[0]
        slot_key = (id(first), convert)
        key = tuple(_key(t, self._fingerprint) for t in tensors)
        refs = tuple(weakref.ref(t) for t in tensors)
        slot = self._cache.get(slot_key)
        if slot is not None and slot[0] == key and all(r() is t for r, t in zip(slot[1], tensors)):
            return slot[2]
        converted = convert(*(t.detach() for t in tensors))
        if slot is None or slot[1][0]() is not first:
            weakref.finalize(first, self._cache.pop, slot_key, None)
        self._cache[slot_key] = (key, refs, converted)
        return converted

    def clear(self) -> None:
        self._cache.clear()
