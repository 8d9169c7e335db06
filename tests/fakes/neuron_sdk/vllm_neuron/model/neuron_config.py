"""Fake vllm_neuron.model.neuron_config: the ``NeuronConfig`` fields our model reads and the runner's
``NeuronConfig.from_dict`` rule for ``on_device_sampling_config`` (absent = on, None = off)."""

from dataclasses import dataclass, field


class OnDeviceSamplingConfig:
    def __init__(self, **kwargs):
        self.all_greedy = bool(kwargs.pop("all_greedy", False))
        self.max_top_k = int(kwargs.pop("max_top_k", 256))


@dataclass
class NeuronConfig:
    ep_degree: int = 1
    attention_dp_size: int = 1
    embedding_dp_size: int = 1
    lm_head_dp_size: int = 1
    mlp_dp_size: int = 1
    on_device_sampling_config: OnDeviceSamplingConfig | None = field(default_factory=OnDeviceSamplingConfig)
    max_logprobs: int = 0
    debug_logits_dir: str | None = None
    quantization: str | None = None
    fp8_packed_kv: bool = False
    num_batched_tokens_buckets: list[int] | None = None
    num_seqs_buckets: list[int] | None = None
    kv_segment_size_buckets: list[int] | None = None

    @classmethod
    def from_dict(cls, config_dict: dict) -> "NeuronConfig":
        config_dict = dict(config_dict)
        if "on_device_sampling_config" in config_dict:
            ods = config_dict.pop("on_device_sampling_config")
            config_dict["on_device_sampling_config"] = None if ods is None else OnDeviceSamplingConfig(**ods)
        return cls(**config_dict)
