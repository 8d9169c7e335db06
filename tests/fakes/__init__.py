"""Fakes of the Neuron software we touch, as real module trees that a test copies into a directory on ``sys.path``.

- ``neuron_sdk/``: shaped like the interfaces ``vllm_nki_moe.platforms.neuron`` documents (vllm-neuron 0.24.0.1.1.0,
  Neuron SDK 2.32.0): same module paths, class and function names, signatures; only what we call exists. Also the
  SDK's other packages as the start-up check finds them (``libtorch_neuronx_lite``, ``neuronxcc``, an ``nki`` that
  fails to import as the emulator's real-package probe then expects), upstream's distribution with its platform entry
  point (``vllm_neuron-*.dist-info``) and the runtime library (``runtime/libnrt.so.1``, an empty file: only its name is
  checked).
- ``nki_moe_harness/``: the nki-moe harness's imports for the contest drop-in (``neuronx_distributed.utils.cpu_mode``
  and NxDI's Qwen3-MoE module), with the structure the drop-in relies on.

Nothing here is imported at collection time: :class:`FakeInstall` copies a tree under a test's temporary directory,
puts it on ``sys.path`` inside one test and removes every module loaded from it afterwards.
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SDK_FILES = HERE / "neuron_sdk"
HARNESS_FILES = HERE / "nki_moe_harness"

# Values the fake modules spell literally (they run in subprocesses that cannot import this package).
FAKE_DEVICES_ENV = "FAKE_NEURON_DEVICES"  # the fake vllm_neuron's stand-in for /dev/neuron* (register() globs them)
PRE_REGISTER_MARKER = "fake vllm_neuron: NeuronPlatform.pre_register_and_update"
UPSTREAM_ARCH = "FakeUpstreamNeuronForCausalLM"  # stands for the architectures upstream registers (Glm5Next...)


class FakeInstall:
    """Copy the fake tree ``files`` under ``root``, put ``root`` first on ``sys.path``; ``remove()`` undoes it,
    modules included."""

    def __init__(self, root: Path, files: Path):
        self.root = root
        shutil.copytree(files, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        sys.path.insert(0, str(root))
        importlib.invalidate_caches()

    def remove_file(self, rel: str) -> None:
        path = self.root / rel
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        importlib.invalidate_caches()

    def loaded_modules(self) -> list[str]:
        root = str(self.root)
        return [
            name
            for name, module in list(sys.modules.items())
            if module is not None and str(getattr(module, "__file__", None) or "").startswith(root)
        ]

    def remove(self) -> None:
        for name in self.loaded_modules():
            del sys.modules[name]
        while str(self.root) in sys.path:
            sys.path.remove(str(self.root))
        importlib.invalidate_caches()
