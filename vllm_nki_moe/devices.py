"""Finding Neuron devices on this host, and saying where we looked when there are none."""

from __future__ import annotations

import glob

# The Neuron driver creates one character device per Neuron device (``/dev/neuron0``, ``/dev/neuron1``, ...); this is
# what AWS's own vLLM Neuron plugin checks (vllm-project/vllm-neuron: vllm_neuron/__init__.py, ``register``).
NEURON_DEVICE_GLOB = "/dev/neuron*"
# The driver's sysfs class, present when the kernel module is loaded even if /dev is not populated (containers).
NEURON_SYSFS_GLOB = "/sys/class/neuron_device/neuron*"


def find_neuron_devices() -> list[str]:
    """Paths of the Neuron devices visible to this process (empty on a machine without Trainium/Inferentia)."""
    return sorted(glob.glob(NEURON_DEVICE_GLOB)) or sorted(glob.glob(NEURON_SYSFS_GLOB))


def where_we_looked() -> str:
    return f"device files {NEURON_DEVICE_GLOB} and driver entries {NEURON_SYSFS_GLOB}"
