"""Fake vllm_neuron.backend: the platform class name ``register()`` returns."""


def get_platform_class() -> str:
    return "vllm_neuron.vllm.platform.NeuronPlatform"
