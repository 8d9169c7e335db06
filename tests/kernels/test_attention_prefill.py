"""kernels/attention_prefill.py: causal GQA flash attention of one sequence matches its fp32 reference, and writes
the sequence's K/V into the paged cache at its slots (padding slots skipped)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm_nki_moe.kernels import attention_prefill as ap
from vllm_nki_moe.kernels.limits import PMAX

from nki_emulator import run
from vllm_nki_moe import ops
from vllm_nki_moe.ops import attention
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close

from .conftest import randn

HEAD_DIM = 128  # Qwen3-30B-A3B head_dim (config.json)
QWEN3_30B_A3B_TP = {1: (32, 4), 4: (8, 1), 8: (4, 1)}  # tp -> (q heads, kv heads) per rank; kv replicated at TP 8
BLOCK_SIZE = 32  # the vLLM Neuron plugin's default block size
# 1 token; PMAX + 1 (a second query tile of one row); 300 (ragged query and PV tiles); 600 (two 512-key score tiles)
TOKENS = [1, PMAX + 1, 300, 600]
# Tolerances (tools/kernel_check/tolerances.py): fp32 goes through QK^T and PV contractions; bf16 rounds P to bf16
# before PV.
# TP 1 (32 heads) only at short lengths: the long ones run the same tiles, 4-8x slower in the emulator
RANK_CASES = [(T, tp) for T in TOKENS for tp in sorted(QWEN3_30B_A3B_TP) if tp > 1 or T <= PMAX + 1]
TOLERANCE = {torch.float32: "float32_matmul", torch.bfloat16: "bfloat16_matmul"}


def _inputs(rng, T, hq, hk, d, dtype, bs=BLOCK_SIZE, pad_every=0):
    """q, k, v, caches (random stale contents) and slots on shuffled blocks; every pad_every-th slot is -1."""
    nb = -(-T // bs) + 3
    q, k, v = randn(rng, (T, hq * d), dtype), randn(rng, (T, hk * d), dtype), randn(rng, (T, hk * d), dtype)
    k_cache, v_cache = randn(rng, (nb, hk, bs, d), dtype), randn(rng, (nb, hk, bs, d), dtype)
    blocks = torch.from_numpy(rng.permutation(nb))
    slots = torch.tensor([int(blocks[t // bs]) * bs + t % bs for t in range(T)], dtype=torch.int32)
    if pad_every:
        slots[::pad_every] = -1
    return q, k, v, k_cache, v_cache, slots, d**-0.5


def _check(args, dtype):
    out, _ = run(ap.attention_prefill, *args)
    ref = ap.attention_prefill_ref(*args)
    assert out[0].dtype == dtype and out[0].shape == args[0].shape
    assert_close(out[0], ref[0], TOLERANCE[dtype])
    assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])  # the cache write is data movement: exact
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,tp", RANK_CASES)
def test_attention_prefill_matches_ref_qwen3_30b_a3b_per_rank(T, tp, dtype, rng):
    hq, hk = QWEN3_30B_A3B_TP[tp]
    _check(_inputs(rng, T, hq, hk, HEAD_DIM, dtype), dtype)


@pytest.mark.parametrize("hq,hk,d", [(4, 2, 64), (6, 1, 32), (3, 3, 16)])  # tiny model's, MQA, MHA; small head_dim
def test_attention_prefill_matches_ref_other_head_layouts(hq, hk, d, rng):
    _check(_inputs(rng, 77, hq, hk, d, torch.float32, bs=16), torch.float32)


def test_attention_prefill_maps_query_head_h_to_kv_head_h_div_group(rng):
    # q = 0: uniform attention, so each output is the mean of its kv head's values; V of kv head g is constant g + 1
    T, hq, hk, d = 5, 8, 2, 16
    q, k, v, k_cache, v_cache, slots, scale = _inputs(rng, T, hq, hk, d, torch.float32)
    q.zero_()
    v = torch.arange(1, hk + 1, dtype=torch.float32).repeat_interleave(d).repeat(T, 1)
    (out, _, _), _ = run(ap.attention_prefill, q, k, v, k_cache, v_cache, slots, scale)
    expected = torch.arange(1, hk + 1, dtype=torch.float32).repeat_interleave(hq // hk).repeat_interleave(d)
    torch.testing.assert_close(out, expected.repeat(T, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T", [200, 600])  # the diagonal inside a 128-row tile, and in the second 512-key tile
def test_attention_prefill_is_causal_at_ragged_lengths(T, rng):
    args = list(_inputs(rng, T, 4, 1, 64, torch.float32))
    (out, _, _), _ = run(ap.attention_prefill, *args)
    cut = T // 2 + 7  # not a tile boundary
    args[1][cut:] = 1e3  # keys and values after `cut` change...
    args[2][cut:] = -1e3
    (out2, _, _), _ = run(ap.attention_prefill, *args)
    assert torch.equal(out[:cut], out2[:cut])  # ...and no earlier query sees them
    assert not torch.equal(out[cut:], out2[cut:])


def test_attention_prefill_skips_padding_slots_and_keeps_other_cache_rows(rng):
    args = _inputs(rng, 70, 4, 2, 64, torch.float32, bs=16, pad_every=3)
    (_, k_cache, v_cache), _ = run(ap.attention_prefill, *args)
    q, k, v, k_old, v_old, slots, _ = args
    written = torch.zeros(k_old.shape[0] * k_old.shape[2], dtype=torch.bool)
    written[slots[slots >= 0].long()] = True
    written = written.view(k_old.shape[0], 1, k_old.shape[2], 1).expand_as(k_old)
    assert torch.equal(k_cache[~written], k_old[~written]) and torch.equal(v_cache[~written], v_old[~written])
    for t in range(0, 70, 3):  # padded tokens were not written anywhere
        assert not (k_cache == k[t].view(2, 64)[0]).all(dim=-1).any()
    ref = ap.attention_prefill_ref(*args)
    assert torch.equal(k_cache, ref[1]) and torch.equal(v_cache, ref[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_attention_prefill_runs_the_kernel_and_updates_the_callers_cache(dtype, rng):
    opset = ops.bind("emulator")
    assert "attention_prefill" in opset.kernel_ops
    q, k, v, k_cache, v_cache, slots, scale = _inputs(rng, 45, 8, 1, HEAD_DIM, dtype, pad_every=4)
    k2, v2 = k_cache.clone(), v_cache.clone()
    got = opset.attention_prefill(q, k, v, k_cache, v_cache, slots.long(), scale)
    want = attention.attention_prefill(q, k, v, k2, v2, slots.long(), scale)
    assert_close(got, want, TOLERANCE[dtype])
    assert torch.equal(k_cache, k2) and torch.equal(v_cache, v2)


def _bad(rng, **change):
    args = dict(
        zip(("q", "k", "v", "k_cache", "v_cache", "slot_mapping", "scale"), _inputs(rng, 9, 4, 2, 16, torch.float32))
    )
    args.update(change)
    return args


INVALID = {
    "head_dim": (
        lambda r: _bad(r, k_cache=torch.zeros(2, 2, 8, 129), v_cache=torch.zeros(2, 2, 8, 129)),
        "head_dim=129",
    ),
    "block_size": (
        lambda r: _bad(r, k_cache=torch.zeros(4, 2, 12, 16), v_cache=torch.zeros(4, 2, 12, 16)),
        "power of two",
    ),
    "gqa": (lambda r: _bad(r, q=torch.zeros(9, 3 * 16)), "multiple of kv heads"),
    "q_width": (lambda r: _bad(r, q=torch.zeros(9, 40)), "multiple of head_dim"),
    "dtypes": (lambda r: _bad(r, v=torch.zeros(9, 32, dtype=torch.bfloat16)), "must all be equal"),
    "q_dtype": (lambda r: _bad(r, q=torch.zeros(9, 64, dtype=torch.bfloat16)), "one matmul dtype"),
    "slot_dtype": (lambda r: _bad(r, slot_mapping=torch.zeros(9, dtype=torch.int16)), "must be int32"),
    "slot_shape": (lambda r: _bad(r, slot_mapping=torch.zeros(8, dtype=torch.int32)), "slot_mapping.shape"),
    "k_shape": (lambda r: _bad(r, k=torch.zeros(9, 16)), "k.shape"),
    "cache_shapes": (lambda r: _bad(r, v_cache=torch.zeros(5, 2, 32, 16)), "must equal k_cache.shape"),
    "tokens": (
        lambda r: _bad(
            r,
            q=torch.zeros(ap.MAX_PREFILL_TOKENS + 1, 1),
            k=torch.zeros(ap.MAX_PREFILL_TOKENS + 1, 1),
            v=torch.zeros(ap.MAX_PREFILL_TOKENS + 1, 1),
            slot_mapping=torch.zeros(ap.MAX_PREFILL_TOKENS + 1, dtype=torch.int32),
        ),
        "T=16385",
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_attention_prefill_rejects_invalid_inputs(case, rng):
    build, message = INVALID[case]
    with pytest.raises(ValueError, match=message):
        run(ap.attention_prefill, **build(rng))


def test_attention_prefill_rejects_caches_beyond_fp32_exact_row_arithmetic():
    # shape-only stand-ins: a real 2^24-row cache would be a large allocation for a check made before any work
    def t(shape):
        return SimpleNamespace(shape=shape, dtype="int32" if len(shape) == 1 else "float32")

    nb = ap.MAX_CACHE_ROWS // 16 + 1
    with pytest.raises(ValueError, match="must be <= 16777216"):
        ap._check_cache_args(
            "attention_prefill", t((3, 8)), t((3, 8)), t((nb, 1, 16, 8)), t((nb, 1, 16, 8)), t((3,)), 3
        )
