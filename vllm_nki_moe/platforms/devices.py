"""What this host has for Neuron serving: devices, the runtime library, the SDK's Python packages; and saying where
we looked, or what to install, when something is missing."""

from __future__ import annotations

import glob
import os
import sys

from vllm_nki_moe import envs

# The Neuron driver creates one character device per Neuron device (``/dev/neuron0``, ``/dev/neuron1``, ...); this is
# what AWS's own vLLM Neuron plugin checks (vllm-project/vllm-neuron: vllm_neuron/__init__.py, ``register``).
NEURON_DEVICE_GLOB = "/dev/neuron*"
# The driver's sysfs class, present when the kernel module is loaded even if /dev is not populated (containers).
NEURON_SYSFS_GLOB = "/sys/class/neuron_device/neuron*"
# The Neuron runtime library (apt package aws-neuronx-runtime-lib, 2.34.10.0 in Neuron SDK 2.32) installs libnrt.so
# under /opt/aws/neuron/lib; AWS's Neuron images put that directory on LD_LIBRARY_PATH (docs/neuron.md section 3.2).
NEURON_RUNTIME_DIR = "/opt/aws/neuron/lib"
NEURON_RUNTIME_LIB_GLOB = "libnrt.so*"


def find_neuron_devices() -> list[str]:
    """Paths of the Neuron devices visible to this process (empty on a machine without Trainium/Inferentia)."""
    return sorted(glob.glob(NEURON_DEVICE_GLOB)) or sorted(glob.glob(NEURON_SYSFS_GLOB))


def where_we_looked() -> str:
    return f"device files {NEURON_DEVICE_GLOB} and driver entries {NEURON_SYSFS_GLOB}"


def find_neuron_runtime() -> list[str]:
    """Paths of the Neuron runtime library (``libnrt.so*``) in its install directory and on ``LD_LIBRARY_PATH``."""
    dirs = [NEURON_RUNTIME_DIR, *(d for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d)]
    found = {path for d in dirs for path in glob.glob(os.path.join(d, NEURON_RUNTIME_LIB_GLOB))}
    return sorted(found)


# The versions this module was written against (docs/neuron.md section 2; deploy/setup-trn2.sh pins the same).
NEURON_SDK_VERSION = "2.32.0"
VLLM_NEURON_VERSION = "0.24.0.1.1.0"
SETUP_HINT = (
    f"install Neuron SDK {NEURON_SDK_VERSION} with vllm-neuron {VLLM_NEURON_VERSION} (deploy/setup-trn2.sh, or AWS's "
    "DLAMI venv /opt/aws_neuronx_venv_pytorch_inference_vllm_0_24_0_1_1_0)"
)

# Python packages of the SDK we need, as (import name, pip requirement), pins from the SDK 2.32.0 manifest
# (aws-neuron/aws-neuron-sdk: src/helperscripts/n2-manifest.json). The framework package is libtorch_neuronx_lite, not
# torch_neuronx: the 2.32.0 manifest no longer lists torch-neuronx, and vllm-neuron 0.24's _init_backend imports
# libtorch_neuronx_lite (it names torch's privateuse1 device "neuron").
SDK_PYTHON_PACKAGES = (
    ("vllm_neuron", f"vllm-neuron=={VLLM_NEURON_VERSION}"),
    ("libtorch_neuronx_lite", "libtorch-neuronx-lite==2.11.0.1.0.1284"),
    ("nki", "nki==0.6.0"),
    ("neuronxcc", "neuronx-cc==2.27.5334.0"),
)
RUNTIME_PACKAGE = "aws-neuronx-runtime-lib 2.34.10.0 (apt)"


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, asked of the import finders without importing it.

    ``importlib.util.find_spec`` would answer from ``sys.modules`` first, where the NKI emulator may be registered as
    ``nki``; the finders only see what is installed.
    """
    loaded = sys.modules.get(module)
    if loaded is not None and not getattr(loaded, "__nki_emulator__", False):
        return True
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        try:
            if find_spec(module, None) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def missing_sdk_pieces(*, need_runtime: bool = True) -> list[str]:
    """What of the Neuron SDK this process lacks, each named as the package to install (empty when complete)."""
    missing = []
    if need_runtime and not find_neuron_runtime():
        missing.append(
            f"the Neuron runtime library {NEURON_RUNTIME_LIB_GLOB} ({RUNTIME_PACKAGE}; looked in "
            f"{NEURON_RUNTIME_DIR} and LD_LIBRARY_PATH)"
        )
    missing.extend(
        f"{requirement} (import {module})" for module, requirement in SDK_PYTHON_PACKAGES if not _installed(module)
    )
    return missing


def sdk_missing_message(found: list[str], missing: list[str]) -> str:
    where = f"Neuron devices {', '.join(found)} are present" if found else "Neuron serving was requested"
    return (
        f"{where} but the Neuron SDK is incomplete; missing: {'; '.join(missing)}. To serve on Neuron, {SETUP_HINT}. "
        f"To serve on this host's CPU instead, set {envs.DEVICE_ENV}=cpu."
    )
