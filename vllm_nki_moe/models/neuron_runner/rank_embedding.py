"""The vocab-parallel embedding lookup with the tensor-parallel rank as a tensor, so every rank runs one graph.

vLLM's ``VocabParallelEmbedding`` masks the token ids with its rank's vocabulary range as Python ints
(``get_masked_input_and_mask(input_, org_vocab_start_index, ...)``,
vllm/model_executor/layers/vocab_parallel_embedding.py), which ``torch.compile`` bakes into the graph: each rank would
compile its own. vLLM Neuron's runner passes ``rank`` to the model's ``forward`` as a tensor so that all ranks share one
compiled graph per bucket (the runner-to-model contract, ``forward(..., rank, ...)``; see ``model.py``). Here the range
comes from that tensor: rank r holds rows ``[r * P, min((r + 1) * P, V))`` of the vocabulary, P the padded rows per
rank, as vLLM's ``_get_indices`` lays them out (``vocab_range_from_global_vocab_size`` over ``org_vocab_size_padded``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WHERE = "neuron_runner.rank_embedding"


def rank_embedding(
    input_ids: torch.Tensor, weight_shard: torch.Tensor, rank: torch.Tensor, rows_per_rank: int, vocab_size: int
) -> torch.Tensor:
    """This rank's share of the embedding of ``input_ids [T]``: rows of ``weight_shard [P', H]`` (P' >= P) for the
    ids in its range, zeros elsewhere; summed over ranks (the all-reduce) it is the full lookup. ``rank``: a scalar
    integer tensor."""
    start = rank.to(input_ids.dtype) * rows_per_rank
    end = torch.clamp(start + rows_per_rank, max=vocab_size)
    inside = (input_ids >= start) & (input_ids < end)
    local = torch.where(inside, input_ids - start, torch.zeros_like(input_ids))
    return F.embedding(local, weight_shard).masked_fill(~inside[:, None], 0)


def rows_per_rank(embedding, tp_rank: int) -> int:
    """P for a vLLM ``VocabParallelEmbedding``, checked against the shard it holds for ``tp_rank``: the rank-tensor
    lookup covers vLLM's layout only (no added vocabulary; rank r starts at r * P)."""
    shard = embedding.shard_indices
    if shard.num_added_elements:
        raise NotImplementedError(f"{WHERE}: {shard.num_added_elements} added vocabulary rows (LoRA); not supported")
    per_rank = shard.num_org_elements_padded
    if shard.padded_org_vocab_start_index != tp_rank * per_rank:
        raise ValueError(
            f"{WHERE}: rank {tp_rank} starts at row {shard.padded_org_vocab_start_index}; expected {tp_rank * per_rank}"
        )
    return per_rank
