"""Fake vllm_neuron.model.registry: ``get_models()`` as vllm-neuron's (a list of ``(architecture, class)``).

vllm-project/vllm-neuron@5528be7 ``vllm_neuron/model/registry.py`` lists Llama, GPT-OSS, Eagle3, Qwen3, Qwen3-VL and
DFlash, not yet its own ``vllm_neuron/model/qwen3_moe`` (present in the same repository). Here one fake class stands
for upstream's Llama (under ``LlamaForCausalLM``, an architecture we also serve) and one for the rest;
``LISTS_QWEN3_MOE`` set to True stands for a release whose registry lists its Qwen3-MoE under that architecture.
"""

from torch import nn

from vllm_neuron.model.upstream_qwen3_moe import UpstreamQwen3MoeForCausalLM

LISTS_QWEN3_MOE = False


class FakeUpstreamNeuronForCausalLM(nn.Module):
    """Stands for upstream's other models."""


class UpstreamLlamaForCausalLM(nn.Module):
    """Stands for upstream's ``vllm_neuron/model/llama``."""


def get_models():
    models = [
        ("FakeUpstreamNeuronForCausalLM", FakeUpstreamNeuronForCausalLM),
        ("LlamaForCausalLM", UpstreamLlamaForCausalLM),
    ]
    if LISTS_QWEN3_MOE:
        models.append(("Qwen3MoeForCausalLM", UpstreamQwen3MoeForCausalLM))
    return models
