"""The fakes stay inside their tests, and the CPU path never touches the Neuron path's modules."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests import fakes
from tests.conftest import REPO
from vllm_nki_moe import ops
from vllm_nki_moe import platforms as plugin_platform
from vllm_nki_moe.ops import kernel_call
from vllm_nki_moe.platforms import devices
from vllm_nki_moe.platforms import neuron as platform_neuron

NEURON_MODULES = ("vllm_neuron", "libtorch_neuronx_lite", "neuronxcc", "neuronx_distributed", "torch_neuronx")


def test_a_fake_neuron_host_leaves_nothing_behind(tmp_path):
    from vllm.model_executor.models.registry import ModelRegistry

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ModelRegistry, "models", dict(ModelRegistry.models))
        mp.setattr(platform_neuron, "_built", {})
        mp.setattr(devices, "NEURON_RUNTIME_DIR", str(tmp_path / "runtime"))
        mp.setattr(devices, "find_neuron_devices", lambda: ["/dev/neuron0"])
        mp.setenv(fakes.FAKE_DEVICES_ENV, "1")
        mp.setenv("VLLM_PLUGINS", "nki_moe,nki_moe_models")
        mp.delenv("VLLM_NKI_MOE_DEVICE", raising=False)
        install = fakes.FakeInstall(tmp_path, fakes.SDK_FILES)
        try:
            assert plugin_platform.register_platform() == platform_neuron.NEURON_PLATFORM
            from vllm.utils.import_utils import resolve_obj_by_qualname

            resolve_obj_by_qualname(platform_neuron.NEURON_PLATFORM).pre_register_and_update(None)
            assert install.loaded_modules() and platform_neuron.platform_active()
        finally:
            install.remove()

    assert not install.loaded_modules()
    assert str(tmp_path) not in sys.path
    assert all(importlib.util.find_spec(name) is None for name in NEURON_MODULES)
    assert fakes.UPSTREAM_ARCH not in ModelRegistry.models
    assert not platform_neuron.platform_active()
    assert plugin_platform.register_platform() in (plugin_platform.CPU_PLATFORM, None)  # this host again
    if not kernel_call.real_nki_available():
        assert ops.resolve_backend("auto") == "torch"


def test_the_cpu_path_never_imports_the_neuron_path():
    code = (
        "import sys\n"
        "from vllm_nki_moe import ops, platforms\n"
        "from vllm_nki_moe.platforms import cpu\n"
        "print(platforms.register_platform())\n"
        "import argparse; cpu.NkiMoeCpuPlatform.pre_register_and_update(argparse.ArgumentParser())\n"
        "print(ops.resolve_backend('auto'))\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {NEURON_MODULES!r}"
        " or m == 'vllm_nki_moe.platforms.neuron'))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("VLLM_NKI_MOE", "VLLM_NEURON"))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    platform_name, backend, neuron_modules = proc.stdout.strip().splitlines()[-3:]
    assert platform_name == plugin_platform.CPU_PLATFORM
    assert backend == "torch"
    assert neuron_modules == "[]"
