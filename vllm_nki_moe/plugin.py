"""vLLM general plugin: registers this package's model classes (Qwen3-MoE; Qwen3 and Llama dense on CPU).

vLLM loads ``vllm.general_plugins`` entry points once in every process (API server, engine core, workers), so this
must be idempotent and cheap: the class is registered lazily as ``"module:Class"`` and imported only when used.
On our Neuron platform the class registered is the runner-contract subclass
(``models.qwen3_moe_neuron.model.NeuronQwen3MoeForCausalLM``, with the ``from_configs`` vllm-neuron's runner calls);
elsewhere the vLLM-style class. The base class never refers to its Neuron subclass. The dense classes
(``models/dense.py``) are registered off Neuron only: the Neuron runner adapter is written for Qwen3-MoE so far, so
on Neuron vLLM's own registry keeps serving those architectures.
"""

from __future__ import annotations

import sys

ARCHITECTURE = "Qwen3MoeForCausalLM"
MODEL_CLASS = "vllm_nki_moe.models.qwen3_moe:Qwen3MoeForCausalLM"
NEURON_MODEL_CLASS = "vllm_nki_moe.models.qwen3_moe_neuron.model:NeuronQwen3MoeForCausalLM"
# architecture -> "module:Class" of our class for it (off Neuron)
MODEL_CLASSES = {
    ARCHITECTURE: MODEL_CLASS,
    "Qwen3ForCausalLM": "vllm_nki_moe.models.dense:Qwen3ForCausalLM",
    "LlamaForCausalLM": "vllm_nki_moe.models.dense:LlamaForCausalLM",
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

    attach_to_vllm_logging()

    # Registering an architecture vLLM already has replaces its class in this process; repeating it is harmless.
    if serving_on_neuron():
        ModelRegistry.register_model(ARCHITECTURE, NEURON_MODEL_CLASS)
        return
    for architecture, cls in MODEL_CLASSES.items():
        ModelRegistry.register_model(architecture, cls)
