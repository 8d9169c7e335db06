"""Finding Neuron devices on this host, and saying where we looked when there are none."""

from __future__ import annotations

import glob
import os

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
