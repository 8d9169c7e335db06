"""vLLM general plugin: registers this package's model classes (Qwen3-MoE, Qwen3 and Llama dense).

vLLM loads ``vllm.general_plugins`` entry points once in every process (API server, engine core, workers), so this
must be idempotent and cheap: the class is registered lazily as ``"module:Class"`` and imported only when used.
On our Neuron platform the classes registered are the runner-contract subclasses (``models.neuron_runner.model``, with
the ``from_configs`` vllm-neuron's runner calls), replacing vllm-neuron's own Llama and Qwen3 for those architectures;
elsewhere the vLLM-style classes. The base classes never refer to their Neuron subclasses.
"""

from __future__ import annotations

import sys

ARCHITECTURE = "Qwen3MoeForCausalLM"
MODEL_CLASS = "vllm_nki_moe.models.qwen3_moe:Qwen3MoeForCausalLM"
NEURON_MODEL_CLASS = "vllm_nki_moe.models.neuron_runner.model:NeuronQwen3MoeForCausalLM"
# architecture -> "module:Class" of our class for it, off Neuron and on it
MODEL_CLASSES = {
    ARCHITECTURE: MODEL_CLASS,
    "Qwen3ForCausalLM": "vllm_nki_moe.models.dense:Qwen3ForCausalLM",
    "LlamaForCausalLM": "vllm_nki_moe.models.dense:LlamaForCausalLM",
}
NEURON_MODEL_CLASSES = {
    ARCHITECTURE: NEURON_MODEL_CLASS,
    "Qwen3ForCausalLM": "vllm_nki_moe.models.neuron_runner.model:NeuronQwen3ForCausalLM",
    "LlamaForCausalLM": "vllm_nki_moe.models.neuron_runner.model:NeuronLlamaForCausalLM",
}


def model_class(architecture: str):
    """Our class for ``architecture`` (imported); an architecture we do not serve is a ``ValueError`` naming ours."""
    import importlib

    if architecture not in MODEL_CLASSES:
        raise ValueError(f"vllm_nki_moe: architecture {architecture!r}; supported: {', '.join(MODEL_CLASSES)}")
    module, name = MODEL_CLASSES[architecture].split(":")
    return getattr(importlib.import_module(module), name)


def serving_on_neuron() -> bool:
    """Whether this process serves on our Neuron platform.

    Asks vLLM's platform (resolving it if this process has not yet: vLLM resolves it before it builds a model anyway)
    and then our Neuron platform module through ``sys.modules``, so the CPU path never imports the Neuron path.
    """
    from vllm.platforms import current_platform

    current_platform.device_type  # noqa: B018 - resolves the platform (our platform plugin builds its class then)
    neuron = sys.modules.get("vllm_nki_moe.platforms.neuron")
    return neuron is not None and neuron.platform_active()


def register_models() -> None:
    from vllm import ModelRegistry

    from vllm_nki_moe.logs import attach_to_vllm_logging
    from vllm_nki_moe.models import fp8  # noqa: F401 - registers our FP8 quantization method with vLLM

    attach_to_vllm_logging()

    # Registering an architecture vLLM already has replaces its class in this process; repeating it is harmless.
    classes = NEURON_MODEL_CLASSES if serving_on_neuron() else MODEL_CLASSES
    for architecture, cls in classes.items():
        ModelRegistry.register_model(architecture, cls)
