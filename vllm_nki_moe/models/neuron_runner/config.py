"""What the runner-contract models (Qwen3-MoE, Qwen3, Llama) read from the Hugging Face config and from
vllm-neuron's ``NeuronConfig``.

``NeuronConfig`` is upstream's dataclass (``vllm_neuron.model.neuron_config.NeuronConfig``, built by the runner from
``--additional-config '{"neuron_config": {...}}'`` with ``NeuronConfig.from_dict``); it is read here by attribute
only, never imported, so these rules are testable without the SDK. Fields read: ``ep_degree``, ``attention_dp_size``,
``embedding_dp_size``, ``lm_head_dp_size``, ``mlp_dp_size``, ``quantization``, ``fp8_packed_kv``,
``on_device_sampling_config`` (``.all_greedy``), ``max_logprobs``, ``debug_logits_dir``. What this model cannot serve
is rejected here, at model construction, as ``<where>: <what>=<value>; <rule>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_nki_moe.models.config import Qwen3MoeSizes, read_sizes

WHERE = "{} (vllm_nki_moe, Neuron runner)"  # .format(architecture)
DTYPES = (torch.bfloat16, torch.float32)  # bf16 on device (platform_neuron.validate_config); fp32 for CPU parity runs
# NeuronConfig parallel layouts other than plain TP: each > 1 shards something our modules do not shard.
DP_FIELDS = ("attention_dp_size", "embedding_dp_size", "lm_head_dp_size", "mlp_dp_size")
QUANTIZATIONS = (None, "bf16")  # NeuronConfig.quantization values with unquantized weights


@dataclass(frozen=True)
class NeuronRunnerConfig:
    sizes: Qwen3MoeSizes  # from the HF config, checked against tp_size for the architecture (models/config.py)
    tp_size: int
    dtype: torch.dtype  # weights, activations and the KV cache
    on_device_sampling: bool  # forward returns (sampled ids, logits | None) instead of logits
    all_greedy: bool  # on-device sampling is argmax whatever sampling_params say
    return_logits: bool  # with on-device sampling, also return the logits (logprobs or debug_logits_dir requested)

    @classmethod
    def from_configs(
        cls,
        hf_config,
        neuron_config=None,
        *,
        tp_size: int,
        dtype: torch.dtype,
        cache_dtype: str = "auto",
        architecture: str = "Qwen3MoeForCausalLM",
    ) -> NeuronRunnerConfig:
        """Validate and collect for ``architecture`` (the model class's); ``neuron_config`` None means upstream
        defaults with on-device sampling off."""
        sizes = read_sizes(hf_config, tp_size=tp_size, architecture=architecture)
        where = WHERE.format(architecture)
        if dtype not in DTYPES:
            raise ValueError(f"{where}: dtype={dtype}; must be one of {', '.join(map(str, DTYPES))}")
        if cache_dtype not in ("auto", None) and cache_dtype != str(dtype).removeprefix("torch."):
            raise NotImplementedError(
                f"{where}: kv_cache_dtype={cache_dtype!r}; the attention kernels keep the cache in the model dtype"
            )
        ep_degree = getattr(neuron_config, "ep_degree", 1) or 1
        if ep_degree > 1:
            raise NotImplementedError(
                f"{where}: neuron_config.ep_degree={ep_degree}; experts are sharded on the intermediate size by TP, "
                "expert parallelism is not implemented"
            )
        for name in DP_FIELDS:
            value = getattr(neuron_config, name, 1) or 1
            if value > 1:
                raise NotImplementedError(f"{where}: neuron_config.{name}={value}; only 1 (plain TP) is supported")
        quantization = getattr(neuron_config, "quantization", None)
        if quantization not in QUANTIZATIONS:
            raise NotImplementedError(
                f"{where}: neuron_config.quantization={quantization!r}; only unquantized weights (None or 'bf16')"
            )
        if getattr(neuron_config, "fp8_packed_kv", False):
            raise NotImplementedError(f"{where}: neuron_config.fp8_packed_kv=True; the KV cache is not quantized")
        sampling = getattr(neuron_config, "on_device_sampling_config", None)
        return cls(
            sizes=sizes,
            tp_size=tp_size,
            dtype=dtype,
            on_device_sampling=sampling is not None,
            all_greedy=bool(getattr(sampling, "all_greedy", False)),
            return_logits=bool(getattr(neuron_config, "max_logprobs", 0))
            or getattr(neuron_config, "debug_logits_dir", None) is not None,
        )
