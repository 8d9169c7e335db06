"""Fixtures for the Neuron-path tests (imported by their conftest.py files): a fake Neuron host (devices, runtime,
SDK packages) for one test at a time."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import fakes
from vllm_nki_moe.platforms import devices, neuron_worker
from vllm_nki_moe.platforms import neuron as platform_neuron


@dataclass
class FakeNeuronHost:
    install: fakes.FakeInstall
    root: Path

    def upstream_calls(self) -> list[tuple]:
        import sys

        return list(sys.modules["vllm_neuron.vllm.platform"].CALLS)


# Top-level modules only the fakes provide on this machine; after every test none may be loaded or importable.
FAKED_MODULES = (
    "vllm_neuron",
    "libtorch_neuronx_lite",
    "neuronxcc",
    "neuronx_distributed",
    "neuronx_distributed_inference",
)


@pytest.fixture(autouse=True)
def no_fake_survives_its_test():
    """Checked after every test here (autouse fixtures are torn down last): the fakes never reach the CPU tests."""
    yield
    leaked = [name for name in FAKED_MODULES if name in sys.modules or importlib.util.find_spec(name) is not None]
    assert not leaked, f"fake Neuron modules outlived their test: {leaked}"


@pytest.fixture
def fake_sdk(tmp_path, monkeypatch):
    """The fake Neuron SDK on sys.path and its runtime library found; no devices yet (see ``neuron_host``)."""
    from vllm.model_executor.models.registry import ModelRegistry

    monkeypatch.setattr(ModelRegistry, "models", dict(ModelRegistry.models))  # registrations end with the test
    monkeypatch.setattr(platform_neuron, "_built", {})
    monkeypatch.setattr(neuron_worker, "_built", {})
    monkeypatch.setattr(platform_neuron, "_logged", set())
    monkeypatch.setattr(devices, "NEURON_RUNTIME_DIR", str(tmp_path / "site" / "runtime"))
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    for name in ("VLLM_NKI_MOE_DEVICE", "VLLM_NKI_MOE_KERNELS", "VLLM_NEURON_CPU_MODE", "VLLM_NEURON_CPU_COMPILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLLM_PLUGINS", ",".join(platform_neuron.OUR_PLUGINS))
    install = fakes.FakeInstall(tmp_path / "site", fakes.SDK_FILES)
    yield FakeNeuronHost(install=install, root=tmp_path / "site")
    install.remove()


@pytest.fixture
def neuron_host(fake_sdk, monkeypatch):
    """A Neuron host: the fake SDK plus one device (ours via ``devices``, the fake vllm_neuron's via its env)."""
    monkeypatch.setattr(devices, "find_neuron_devices", lambda: ["/dev/neuron0"])
    monkeypatch.setenv(fakes.FAKE_DEVICES_ENV, "1")
    return fake_sdk


@pytest.fixture
def cpu_host(monkeypatch):
    """This machine as it is (no Neuron device, no SDK), whatever the environment says."""
    monkeypatch.setattr(devices, "find_neuron_devices", lambda: [])
    for name in ("VLLM_NKI_MOE_DEVICE", "VLLM_NKI_MOE_KERNELS", "VLLM_NEURON_CPU_MODE"):
        monkeypatch.delenv(name, raising=False)
