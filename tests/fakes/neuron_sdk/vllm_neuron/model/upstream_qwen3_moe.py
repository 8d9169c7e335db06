"""Stands for vllm-neuron's own Qwen3-MoE (vllm-project/vllm-neuron ``vllm_neuron/model/qwen3_moe/factory.py``,
class ``Qwen3MoeForCausalLM``); never built here, only registered."""

from torch import nn


class UpstreamQwen3MoeForCausalLM(nn.Module):  # vLLM's register_model takes nn.Module subclasses
    pass
