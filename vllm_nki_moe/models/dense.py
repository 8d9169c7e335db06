"""Dense decoders on the same layers as Qwen3-MoE: every op through ``ops``, vLLM's linears, embedding and attention.

A dense model is ``Qwen3MoeForCausalLM`` with no experts: every layer's MLP is the dense SwiGLU one, which the MoE
model already has for ``mlp_only_layers``. What differs is read from the config by ``config.read_sizes`` for the
class's ``architecture``: Qwen3 keeps q/k RMSNorm; Llama has none and accepts Llama 3 RoPE scaling. Checkpoint names
are the same Hugging Face names (``model.layers.N.self_attn.q_proj`` ..., ``mlp.gate_proj`` ...).
"""

from __future__ import annotations

from vllm_nki_moe.models.qwen3_moe import Qwen3MoeForCausalLM


class Qwen3ForCausalLM(Qwen3MoeForCausalLM):
    """Qwen3 dense (Qwen/Qwen3-0.6B ... 32B): q/k RMSNorm, default RoPE, tied or untied embeddings."""

    architecture = "Qwen3ForCausalLM"


class LlamaForCausalLM(Qwen3MoeForCausalLM):
    """Llama 3.x (meta-llama/Llama-3.2-1B ...): no q/k norm, default or ``llama3`` RoPE scaling, GQA, tied or
    untied embeddings."""

    architecture = "LlamaForCausalLM"
