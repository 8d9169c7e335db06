"""The environment variables this plugin reads, each parsed and validated in one place."""

from __future__ import annotations

import os

KERNELS_ENV = "VLLM_NKI_MOE_KERNELS"
KERNEL_BACKENDS = ("auto", "torch", "emulator", "nki")

# --additional-config '{"nki_moe": {...}}': the per-server settings; "kernels" overrides VLLM_NKI_MOE_KERNELS.
ADDITIONAL_CONFIG_SECTION = "nki_moe"
ADDITIONAL_CONFIG_KEYS = ("kernels",)

DEVICE_ENV = "VLLM_NKI_MOE_DEVICE"
DEVICES = ("auto", "cpu", "neuron")


def kernel_backend() -> str:
    """``VLLM_NKI_MOE_KERNELS``: which implementation the model's ops use (default ``auto``)."""
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if value not in KERNEL_BACKENDS:
        raise ValueError(f"{KERNELS_ENV}={value!r}; must be one of {', '.join(KERNEL_BACKENDS)}")
    return value


def configured_kernels(additional_config: dict | None) -> str | None:
    """``--additional-config``'s ``nki_moe.kernels`` (checked), or None when the section or key is absent."""
    section = (additional_config or {}).get(ADDITIONAL_CONFIG_SECTION)
    if section is None:
        return None
    where = f"additional_config.{ADDITIONAL_CONFIG_SECTION}"
    if not isinstance(section, dict):
        raise ValueError(f"{where}={section!r}; must be a JSON object")
    unknown = sorted(set(section) - set(ADDITIONAL_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{where} keys {unknown}; allowed: {', '.join(ADDITIONAL_CONFIG_KEYS)}")
    kernels = section.get("kernels")
    if kernels is not None and kernels not in KERNEL_BACKENDS:
        raise ValueError(f"{where}.kernels={kernels!r}; must be one of {', '.join(KERNEL_BACKENDS)}")
    return kernels


def requested_device() -> str:
    """``VLLM_NKI_MOE_DEVICE``: the platform to activate at start-up (default ``auto``: detect)."""
    value = os.environ.get(DEVICE_ENV, "auto").strip().lower() or "auto"
    if value not in DEVICES:
        raise ValueError(f"{DEVICE_ENV}={value!r}; must be one of {', '.join(DEVICES)}")
    return value


HOST_OPS_ENV = "VLLM_NKI_MOE_HOST_OPS"
HOST_OPS_CHOICES = ("auto", "off")


def host_ops() -> str:
    """``VLLM_NKI_MOE_HOST_OPS``: ``auto`` (the torch backend's fast path where vLLM's CPU ops are loaded), ``off``."""
    value = os.environ.get(HOST_OPS_ENV, "auto").strip().lower() or "auto"
    if value not in HOST_OPS_CHOICES:
        raise ValueError(f"{HOST_OPS_ENV}={value!r}; must be one of {', '.join(HOST_OPS_CHOICES)}")
    return value


# The Neuron runtime's logical-core size (aws-neuron-sdk deploy/eks/prerequisites.rst: trn2 runs at LNC=2 unless
# NEURON_LOGICAL_NC_CONFIG=1). Kernels written for a launch grid run one program per physical core of it.
LNC_ENV = "NEURON_LOGICAL_NC_CONFIG"
LNC_VALUES = (1, 2)


def logical_nc(default: int = 1) -> int:
    """``NEURON_LOGICAL_NC_CONFIG`` as an int (1 or 2), ``default`` when unset; anything else is a ``ValueError``."""
    text = os.environ.get(LNC_ENV, "").strip()
    if not text:
        return default
    if text not in {str(v) for v in LNC_VALUES}:
        raise ValueError(f"{LNC_ENV}={text!r}; must be 1 or 2 (physical cores per logical core)")
    return int(text)
