"""vLLM general plugin: registers this package's Qwen3-MoE model class.

vLLM loads ``vllm.general_plugins`` entry points once in every process (API server, engine core, workers), so this
must be idempotent and cheap: the class is registered lazily as ``"module:Class"`` and imported only when used.
"""

from __future__ import annotations

ARCHITECTURE = "Qwen3MoeForCausalLM"
MODEL_CLASS = "vllm_nki_moe.model.qwen3_moe:Qwen3MoeForCausalLM"


def register_models() -> None:
    from vllm import ModelRegistry

    from .logs import attach_to_vllm_logging

    attach_to_vllm_logging()

    # Registering an architecture vLLM already has replaces its class in this process; repeating it is harmless.
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
