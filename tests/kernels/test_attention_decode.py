"""kernels/attention_decode.py: one query token per sequence against the paged KV cache (shuffled blocks, per-sequence
context lengths) matches its fp32 reference, after writing the new token's K/V at its slot."""

from __future__ import annotations

import pytest
import torch
from vllm_nki_moe.kernels import attention_decode as ad
from vllm_nki_moe.kernels.limits import PMAX

from nki_emulator import run
from vllm_nki_moe import ops
from vllm_nki_moe.ops import attention
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close

from .conftest import randn

HEAD_DIM = 128  # Qwen3-30B-A3B head_dim (config.json)
QWEN3_30B_A3B_TP = {1: (32, 4), 4: (8, 1), 8: (4, 1)}  # tp -> (q heads, kv heads) per rank; kv replicated at TP 8
BLOCK_SIZE = 32  # the vLLM Neuron plugin's default block size
# Context lengths of one batch: 1 (the new token alone), a ragged block, the contest's 640, exactly full blocks
CONTEXTS = [1, 33, 640, 4 * BLOCK_SIZE]
TOLERANCE = {torch.float32: "float32_matmul", torch.bfloat16: "bfloat16_matmul"}  # as test_attention_prefill
GARBAGE = 1e4  # stale cache contents outside every context: large enough to show if they leaked into a softmax


def _inputs(rng, lens, hq, hk, d, dtype, bs=BLOCK_SIZE, max_blocks=None, spare=5, pad=()):
    """A batch whose sequences own shuffled blocks of one cache filled with GARBAGE outside their contexts.

    Table entries past a sequence's blocks point at block 0 (read and masked); sequences in ``pad`` get slot -1.
    """
    B = len(lens)
    used = [-(-L // bs) for L in lens]
    max_blocks = max_blocks or max(used)
    nb = sum(used) + spare
    k_cache = torch.full((nb, hk, bs, d), GARBAGE, dtype=dtype)
    v_cache = torch.full((nb, hk, bs, d), -GARBAGE, dtype=dtype)
    order = torch.from_numpy(rng.permutation(nb))
    tables = torch.zeros(B, max_blocks, dtype=torch.int32)
    start = 0
    for b, (L, n) in enumerate(zip(lens, used)):
        tables[b, :n] = order[start : start + n].to(torch.int32)
        start += n
        pos = torch.arange(L - 1)  # the context before the new token holds real values
        blocks = tables[b, pos // bs].long()
        k_cache[blocks, :, pos % bs, :] = randn(rng, (L - 1, hk, d), dtype)
        v_cache[blocks, :, pos % bs, :] = randn(rng, (L - 1, hk, d), dtype)
    slots = torch.tensor([int(tables[b, (L - 1) // bs]) * bs + (L - 1) % bs for b, L in enumerate(lens)])
    slots[list(pad)] = -1
    q, k, v = randn(rng, (B, hq * d), dtype), randn(rng, (B, hk * d), dtype), randn(rng, (B, hk * d), dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    return q, k, v, k_cache, v_cache, slots.to(torch.int32), tables, ctx, d**-0.5


def _check(args, dtype):
    out, _ = run(ad.attention_decode, *args)
    ref = ad.attention_decode_ref(*args)
    assert out[0].dtype == dtype and out[0].shape == args[0].shape
    assert_close(out[0], ref[0], TOLERANCE[dtype])
    assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])  # the cache write is data movement: exact
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tp", sorted(QWEN3_30B_A3B_TP))
def test_attention_decode_matches_ref_qwen3_30b_a3b_per_rank(tp, dtype, rng):
    hq, hk = QWEN3_30B_A3B_TP[tp]
    _check(_inputs(rng, CONTEXTS, hq, hk, HEAD_DIM, dtype), dtype)


@pytest.mark.parametrize("lens", [[1], [PMAX * BLOCK_SIZE + 5, 17]])  # one token; > 128 blocks (two block tiles)
def test_attention_decode_matches_ref_at_context_1_and_beyond_one_block_tile(lens, rng):
    _check(_inputs(rng, lens, 8, 1, HEAD_DIM, torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("bs", [1, 16, 128])  # every block split factor, from one token per block to a full tile
def test_attention_decode_matches_ref_at_the_maximum_context_of_the_table(bs, rng):
    max_blocks = 5
    lens = [max_blocks * bs, 1, max_blocks * bs - 1]
    _check(_inputs(rng, lens, 4, 2, 64, torch.float32, bs=bs, max_blocks=max_blocks), torch.float32)


@pytest.mark.parametrize("hq,hk,d", [(4, 2, 64), (6, 1, 32), (3, 3, 16)])  # tiny model's, MQA, MHA; small head_dim
def test_attention_decode_matches_ref_other_head_layouts(hq, hk, d, rng):
    _check(_inputs(rng, [3, 50, 21], hq, hk, d, torch.float32, bs=16), torch.float32)


@pytest.mark.parametrize("window", [1, 3])
def test_attention_decode_gathers_ahead_within_its_sbuf_budget(window, rng, monkeypatch):
    """With room for 1 or 3 pairs' first tiles, the (sequence, kv head) pairs are gathered that far ahead: every
    pair still attends over its own context (ragged, one beyond a block tile, kv heads interleaved)."""
    args = _inputs(rng, [3, PMAX * 4 + 9, 50, 1, 21], 4, 2, 32, torch.float32, bs=4)
    monkeypatch.setattr(ad, "PREFETCH_SBUF_BYTES", window * ad.first_tile_bytes(args[3], args[6]))
    _check(args, torch.float32)


def test_attention_decode_maps_query_head_h_to_kv_head_h_div_group(rng):
    # q = 0: uniform attention over the context; V of kv head g is g + 1 everywhere in the context
    hq, hk, d, bs = 8, 2, 16, 4
    args = list(_inputs(rng, [6, 9], hq, hk, d, torch.float32, bs=bs))
    args[0].zero_()
    head_value = torch.arange(1, hk + 1, dtype=torch.float32)
    args[2] = head_value.repeat_interleave(d).repeat(2, 1)
    tables, ctx = args[6], args[7]
    for b, L in enumerate(ctx.tolist()):
        pos = torch.arange(L)
        args[4][tables[b, pos // bs].long(), :, pos % bs, :] = head_value[None, :, None]
    (out, _, _), _ = run(ad.attention_decode, *args)
    expected = head_value.repeat_interleave(hq // hk).repeat_interleave(d)
    torch.testing.assert_close(out, expected.repeat(2, 1), rtol=1e-6, atol=1e-6)


def test_attention_decode_ignores_cache_contents_past_each_context(rng):
    args = _inputs(rng, [40, 3], 4, 1, 64, torch.float32, bs=16, max_blocks=6)
    (out, _, _), _ = run(ad.attention_decode, *args)
    assert out.abs().max() < 10  # GARBAGE (1e4) values are everywhere outside the contexts
    assert_close(out, ad.attention_decode_ref(*args)[0], "float32_matmul")


def test_attention_decode_skips_padding_slots(rng):
    args = _inputs(rng, [5, 9, 2], 4, 2, 64, torch.float32, bs=8, pad=(1,))
    (out, k_cache, v_cache), _ = run(ad.attention_decode, *args)
    q, k, v, k_old, v_old, slots, tables, ctx, _ = args
    changed = (k_cache != k_old).any(dim=-1)  # [NB, Hk, BS]
    rows = {(int(s) // 8, int(s) % 8) for s in slots if s >= 0}
    assert {(int(b), int(o)) for b, _, o in changed.nonzero()} == rows
    ref = ad.attention_decode_ref(*args)
    assert torch.equal(k_cache, ref[1]) and torch.equal(v_cache, ref[2])
    assert_close(out[[0, 2]], ref[0][[0, 2]], "float32_matmul")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_attention_decode_runs_the_kernel_and_updates_the_callers_cache(dtype, rng):
    opset = ops.bind("emulator")
    assert "attention_decode" in opset.kernel_ops
    q, k, v, k_cache, v_cache, slots, tables, ctx, scale = _inputs(rng, [7, 70], 8, 1, HEAD_DIM, dtype)
    k2, v2 = k_cache.clone(), v_cache.clone()
    got = opset.attention_decode(q, k, v, k_cache, v_cache, slots.long(), tables.long(), ctx.long(), scale)
    want = attention.attention_decode(q, k, v, k2, v2, slots.long(), tables.long(), ctx.long(), scale)
    assert_close(got, want, TOLERANCE[dtype])
    assert torch.equal(k_cache, k2) and torch.equal(v_cache, v2)


def _bad(rng, **change):
    names = ("q", "k", "v", "k_cache", "v_cache", "slot_mapping", "block_tables", "context_lens", "scale")
    args = dict(zip(names, _inputs(rng, [3, 20], 4, 2, 16, torch.float32, bs=8)))
    args.update(change)
    return args


def _cache(*shape, dtype=torch.float32):
    return dict(k_cache=torch.zeros(shape, dtype=dtype), v_cache=torch.zeros(shape, dtype=dtype))


INVALID = {
    "head_dim": (lambda r: _bad(r, **_cache(4, 2, 8, 129)), "head_dim=129"),
    "block_size": (lambda r: _bad(r, **_cache(4, 2, 12, 16)), "power of two"),
    "kv_tile": (
        lambda r: _bad(
            r, **_cache(2, 1, 512, 128), q=torch.zeros(2, 256), k=torch.zeros(2, 128), v=torch.zeros(2, 128)
        ),
        "block_size=512, head_dim=128: K/V block tiles need",
    ),
    "group": (
        lambda r: _bad(r, q=torch.zeros(2, (PMAX + 1) * 2 * 16)),
        "q heads per kv head=129",
    ),
    "gqa": (lambda r: _bad(r, q=torch.zeros(2, 3 * 16)), "multiple of kv heads"),
    "dtypes": (lambda r: _bad(r, v=torch.zeros(2, 32, dtype=torch.bfloat16)), "must all be equal"),
    "q_dtype": (lambda r: _bad(r, q=torch.zeros(2, 64, dtype=torch.bfloat16)), "one matmul dtype"),
    "table_shape": (lambda r: _bad(r, block_tables=torch.zeros(3, 3, dtype=torch.int32)), "block_tables.shape"),
    "table_dtype": (lambda r: _bad(r, block_tables=torch.zeros(2, 3, dtype=torch.int16)), "block_tables dtype"),
    "lens_shape": (lambda r: _bad(r, context_lens=torch.ones(3, dtype=torch.int32)), "context_lens.shape"),
    "lens_dtype": (lambda r: _bad(r, context_lens=torch.ones(2, dtype=torch.int16)), "context_lens dtype"),
    "slot_shape": (lambda r: _bad(r, slot_mapping=torch.zeros(3, dtype=torch.int32)), "slot_mapping.shape"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_attention_decode_rejects_invalid_inputs(case, rng):
    build, message = INVALID[case]
    with pytest.raises(ValueError, match=message):
        run(ad.attention_decode, **build(rng))


def test_ops_attention_decode_explicit_backend_raises_the_kernel_limit(rng):
    args = _inputs(rng, [3], 4, 2, 16, torch.float32, bs=8)
    q, k, v = torch.zeros(1, 256), torch.zeros(1, 128), torch.zeros(1, 128)
    big = torch.zeros(2, 1, 512, 128)
    with pytest.raises(ValueError, match="attention_decode: block_size=512"):
        ops.bind("emulator").attention_decode(q, k, v, big, big.clone(), *args[5:])


@pytest.mark.parametrize("tokens", [1, 3])
def test_kernel_check_attention_cases_pass_at_qwen3_30b_a3b_tp8(tokens):
    from vllm_nki_moe.tools.kernel_check import cases_attention
    from vllm_nki_moe.tools.kernel_check.runner import run_cases
    from vllm_nki_moe.tools.kernel_check.shapes import kernel_shapes

    cases = cases_attention.cases(kernel_shapes(None, tp=8), tokens)
    # head_dim 128: the fused attention halves are checked too; at these batches the bf16 one is what a bf16 step
    # counts (the FP8 one counts only in an FP8 checkpoint's step)
    kernels = [
        "attention_prefill",
        "attention_decode",
        "attention_block_decode",
        "attention_block_decode_fp8",
        "attention_decode",
    ]
    assert [c.kernel for c in cases] == kernels
    assert [c.calls_per_layer for c in cases] == [1, 0, 1, 0, 0]
    rows = run_cases(cases)
    assert all(r.passed for r in rows), [r.reason for r in rows]
    decode_long = rows[4]
    assert "ctx=4096" in decode_long.shapes
    # HBM-bound engines: most of the KV read rate (the dependency estimate, roofline_pct, adds the online-softmax
    # chain: about 27% of the roofline at B=1, reported by kernels check/bench)
    assert (
        decode_long.engine_bound_seconds > 0 and decode_long.roofline_seconds > 0.5 * decode_long.engine_bound_seconds
    )


@pytest.mark.parametrize("lens,pad", [(CONTEXTS, ()), ([40, 1, 640], (1,)), ([77], ())])  # even, odd with padding, one
def test_attention_decode_on_two_programs_splits_the_sequences(lens, pad, rng):
    args = _inputs(rng, lens, 8, 1, HEAD_DIM, torch.bfloat16, pad=pad)
    ref = ad.attention_decode_ref(*args)
    one, one_rep = run(ad.attention_decode, *[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    two, two_rep = run(ad.attention_decode[2], *args)
    assert two_rep.num_programs == 2
    assert torch.equal(two[0], one[0])  # each sequence is computed alike on whichever core takes it
    assert_close(two[0], ref[0], "bfloat16_matmul")
    assert torch.equal(two[1], ref[1]) and torch.equal(two[2], ref[2])  # every new K/V written once, by its owner
    if len(lens) >= 2:  # core 1 takes the last sequences, core 0 the first: each does part of the work
        assert two_rep.estimated_seconds < 0.9 * one_rep.estimated_seconds, two_rep.format()
