"""The nki backend calls kernels through vLLM Neuron's wrap_nki (the op torch.compile can trace), once per kernel."""

from __future__ import annotations

import sys
import types

import pytest

from vllm_nki_moe.ops import kernel_call


@pytest.fixture
def fresh_kernel_call_caches():
    kernel_call._wrap_nki.cache_clear()
    kernel_call._device_caller.cache_clear()
    yield
    kernel_call._wrap_nki.cache_clear()
    kernel_call._device_caller.cache_clear()


def fake_hop_module(wrapped: list):
    """`wrap_nki(kernel)` returns a caller indexable by a grid, as vllm-neuron's NKIHOPCaller is."""

    class Caller:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return self

        def __call__(self, *args, **kwargs):
            return ("via wrap_nki", self.kernel(*args, **kwargs))

    def wrap_nki(kernel):
        wrapped.append(kernel.__name__)
        return Caller(kernel)

    module = types.ModuleType("vllm_neuron.nki.nki_hop")
    module.wrap_nki = wrap_nki
    return module


def test_nki_backend_wraps_each_kernel_once(monkeypatch, fresh_kernel_call_caches):
    wrapped: list = []
    for name in ("vllm_neuron", "vllm_neuron.nki"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm_neuron.nki.nki_hop", fake_hop_module(wrapped))

    def double(x):
        return 2 * x

    assert kernel_call.call_kernel("nki", double, 3) == ("via wrap_nki", 6)
    assert kernel_call.call_kernel("nki", double, 4) == ("via wrap_nki", 8)
    assert wrapped == ["double"]


def test_without_wrap_nki_the_kernel_is_called_directly_with_a_warning(monkeypatch, fresh_kernel_call_caches):
    for name in kernel_call.WRAP_NKI_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # import of these fails
    warnings: list[str] = []
    monkeypatch.setattr(kernel_call.logger, "warning", lambda msg, *args: warnings.append(msg % args))

    def triple(x):
        return 3 * x

    assert kernel_call.call_kernel("nki", triple, 2) == 6
    assert kernel_call.call_kernel("nki", triple, 3) == 9
    assert len(warnings) == 1 and all(name in warnings[0] for name in kernel_call.WRAP_NKI_MODULES)
