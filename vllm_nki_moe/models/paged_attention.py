"""One layer's attention over a paged KV cache, through ``ops.attention_prefill`` / ``ops.attention_decode``.

Shared by the ``generate`` harness (``generate.PagedKVCache``) and the vLLM Neuron runner adapter
(``model.neuron.model.RunnerKVCache``): both stand a :class:`PagedAttention` in for each layer's vLLM ``Attention``
and describe the current forward pass in a cache object, read per call:

- ``cache.k[layer]``, ``cache.v[layer]``: the layer's caches ``[num_blocks, kv_heads, block_size, head_dim]`` (vLLM's
  HND layout, the Neuron runner's layout), written in place by the ops;
- ``cache.step``: ``{"phase": "prefill" | "decode", "slot_mapping": [T], "block_tables": [T, MB],
  "context_lens": [T]}``. ``prefill``: the T tokens are one sequence from position 0 (padding may follow, with
  slot -1), causal attention among them. ``decode``: each token is a row with its own block table and context length
  (its position + 1), its K/V written at its slot first.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_nki_moe import ops


class PagedAttention(nn.Module):
    """Stands in for one layer's vLLM ``Attention``: ``forward(q [T, Hq*D], k, v [T, Hk*D]) -> [T, Hq*D]``."""

    def __init__(self, cache, layer: int, scale: float, opset: ops.OpSet) -> None:
        super().__init__()
        self.cache, self.layer, self.scale, self.ops = cache, layer, scale, opset

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        step = self.cache.step
        k_cache, v_cache = self.cache.k[self.layer], self.cache.v[self.layer]
        if step["phase"] == "prefill":
            return self.ops.attention_prefill(q, k, v, k_cache, v_cache, step["slot_mapping"], self.scale)
        return self.ops.attention_decode(
            q, k, v, k_cache, v_cache, step["slot_mapping"], step["block_tables"], step["context_lens"], self.scale
        )
