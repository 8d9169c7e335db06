"""The vocab-parallel embedding from a rank tensor (``neuron_runner.rank_embedding``) against vLLM's own shard
layout (``VocabParallelEmbedding._get_indices``, the real function) and the full lookup."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from vllm.model_executor.layers.vocab_parallel_embedding import (
    DEFAULT_VOCAB_PADDING_SIZE,
    VocabParallelEmbedding,
    pad_vocab_size,
)

from vllm_nki_moe.models.neuron_runner.rank_embedding import rank_embedding, rows_per_rank

VOCAB, HIDDEN = 1000, 8  # 1000 pads to 1024: the last rank's shard ends in padding rows


def _shards(tp: int, vocab: int = VOCAB, added: int = 0):
    """Each rank's embedding as vLLM builds it: its shard indices and its weight rows of a padded full table."""
    g = torch.Generator().manual_seed(tp)
    org_padded = pad_vocab_size(vocab, DEFAULT_VOCAB_PADDING_SIZE)
    padded = pad_vocab_size(org_padded + added, DEFAULT_VOCAB_PADDING_SIZE)
    full = torch.randn(padded, HIDDEN, generator=g)
    ranks = []
    for r in range(tp):
        shard = VocabParallelEmbedding._get_indices(padded, org_padded, vocab + added, vocab, r, tp)
        rows = full[shard.padded_org_vocab_start_index : shard.padded_org_vocab_end_index]
        ranks.append(SimpleNamespace(shard_indices=shard, weight=rows))
    return full[:vocab], ranks


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_the_ranks_shares_sum_to_the_full_lookup(tp):
    table, ranks = _shards(tp)
    ids = torch.tensor([0, 1, 255, 256, 511, 767, 768, 998, 999, 5, 999])
    total = sum(
        rank_embedding(ids, emb.weight, torch.tensor(r), rows_per_rank(emb, r), VOCAB) for r, emb in enumerate(ranks)
    )
    torch.testing.assert_close(total, F.embedding(ids, table), rtol=0, atol=0)


def test_every_rank_runs_the_one_compiled_graph():
    table, ranks = _shards(4)
    ids = torch.arange(0, VOCAB, 37)
    compiled = torch.compile(rank_embedding, fullgraph=True, dynamic=False, backend="aot_eager")
    torch._dynamo.reset()
    per_rank = rows_per_rank(ranks[0], 0)
    outs = [compiled(ids, ranks[0].weight, torch.tensor(0), per_rank, VOCAB)]
    torch.compiler.set_stance("fail_on_recompile")  # a rank-specific constant in the graph would recompile here
    try:
        outs += [compiled(ids, emb.weight, torch.tensor(r), per_rank, VOCAB) for r, emb in enumerate(ranks) if r]
    finally:
        torch.compiler.set_stance("default")
    torch.testing.assert_close(sum(outs), F.embedding(ids, table), rtol=0, atol=0)


def test_a_layout_other_than_vllms_is_refused():
    _, ranks = _shards(4)
    with pytest.raises(ValueError, match="rank 1 starts at row 512; expected 256"):
        rows_per_rank(ranks[2], 1)
    _, with_added = _shards(2, added=10)
    with pytest.raises(NotImplementedError, match="added vocabulary"):
        rows_per_rank(with_added[0], 0)  # rank 0 holds the 10 added rows
