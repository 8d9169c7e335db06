"""``--device {auto,cpu,neuron}`` for ``vllm serve``, shared by both platforms (vLLM removed the flag in v0.10)."""

from __future__ import annotations

import argparse

from vllm_nki_moe import envs
from vllm_nki_moe.platforms import devices


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
            missing = devices.missing_sdk_pieces()
            if missing:
                parser.error(f"--device neuron: {devices.sdk_missing_message(found, missing)}")
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
