"""Fake vllm_neuron.model.kv_cache: the runner-to-model contract's KV types (vllm_neuron/model/kv_cache.py), the
fields our model reads."""

from dataclasses import dataclass

import torch


@dataclass
class LayerSpec:
    name: str
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    sliding_window_size: int | None = None
    chunk_size: int | None = None


@dataclass
class KVSpec:
    layers: list[LayerSpec]
