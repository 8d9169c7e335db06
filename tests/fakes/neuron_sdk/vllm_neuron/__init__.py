"""Fake vllm-neuron 0.24.0.1.1.0: the package entry point ``register`` and its import-time backend init."""

import glob
import os

INIT_CALLS = []


def _init_backend():
    import libtorch_neuronx_lite  # noqa: F401  (the real one names torch's privateuse1 device "neuron")

    INIT_CALLS.append("init_backend")


def _is_neuron_dev():
    return bool(glob.glob("/dev/neuron*")) or os.environ.get("FAKE_NEURON_DEVICES") == "1"


def _is_cpu_mode():
    return os.environ.get("VLLM_NEURON_CPU_MODE", "0") == "1"


def _is_cpu_compile():
    return os.environ.get("VLLM_NEURON_CPU_COMPILE", "0") == "1"


def register():
    if not _is_cpu_mode() and not _is_cpu_compile() and not _is_neuron_dev():
        return None
    from vllm_neuron.backend import get_platform_class
    from vllm_neuron.vllm.platform import _patch_dcp_config_validation

    _patch_dcp_config_validation()
    return get_platform_class()


_init_backend()
