"""kernels/rope.py: neox RoPE of q and k is bit-identical to ops_torch.apply_rope (Hugging Face's numerics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm_nki_moe.kernels import rope
from vllm_nki_moe.kernels.limits import PMAX

from vllm_nki_moe import ops, ops_torch
from vllm_nki_moe.emulator import run

from .conftest import SEED, randn

THETA = 1e6  # Qwen3-30B-A3B rope_theta (config.json)
HEAD_DIM = 128
POSITIONS = 4096  # cache rows for the tests (the model builds max_position_embeddings rows)
QWEN3_30B_A3B_TP = {1: (32, 4), 4: (8, 1), 8: (4, 1)}  # tp -> (q heads, kv heads) per rank
TOKENS = [1, PMAX - 1, PMAX + 1]
DTYPES = [torch.bfloat16, torch.float32]
CACHE = ops_torch.rope_cos_sin_cache(HEAD_DIM, POSITIONS, THETA)


def _inputs(rng, T, hq, hk, D, dtype, positions=POSITIONS):
    q, k = randn(rng, (T, hq * D), dtype), randn(rng, (T, hk * D), dtype)
    pos = torch.from_numpy(rng.integers(0, positions, size=T)).to(torch.int64)
    return q, k, pos


def _check(q, k, pos, cache, D):
    (q_out, k_out), _ = run(rope.rope, q, k, pos.to(torch.int32), cache)
    q_ref, k_ref = ops_torch.apply_rope(q, k, pos, cache, D)
    assert q_out.dtype == q.dtype and q_out.shape == q.shape and k_out.shape == k.shape
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    q_ref2, k_ref2 = rope.rope_ref(q, k, pos.to(torch.int32), cache)
    assert torch.equal(q_out, q_ref2) and torch.equal(k_out, k_ref2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", sorted(QWEN3_30B_A3B_TP))
@pytest.mark.parametrize("T", TOKENS)
def test_rope_is_bit_identical_to_torch_qwen3_30b_a3b_per_rank(T, tp, dtype, rng):
    hq, hk = QWEN3_30B_A3B_TP[tp]
    _check(*_inputs(rng, T, hq, hk, HEAD_DIM, dtype), CACHE, HEAD_DIM)


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 200),
    hq=st.integers(1, 6),
    hk=st.integers(1, 3),
    half=st.integers(1, 40),
    bf16=st.booleans(),
)
def test_rope_is_bit_identical_to_torch_any_shape(T, hq, hk, half, bf16):
    rng = np.random.default_rng(SEED)
    D = 2 * half
    cache = ops_torch.rope_cos_sin_cache(D, 300, 10000.0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    _check(*_inputs(rng, T, hq, hk, D, dtype, positions=300), cache, D)


def test_rope_gathers_only_the_cache_rows_of_the_positions(rng):
    T = 5
    q, k, pos = _inputs(rng, T, 8, 1, HEAD_DIM, torch.bfloat16)
    _, report = run(rope.rope, q, k, pos.to(torch.int32), CACHE)
    qk_bytes = T * 9 * HEAD_DIM * 2
    assert report.hbm_read_bytes == qk_bytes + T * 4 + T * HEAD_DIM * 4
    assert report.hbm_write_bytes == qk_bytes


def test_ops_apply_rope_runs_the_kernel_and_matches_torch(rng):
    opset = ops.bind("emulator")
    assert "apply_rope" in opset.kernel_ops
    q, k, pos = _inputs(rng, 7, 4, 1, HEAD_DIM, torch.float32)
    got = opset.apply_rope(q, k, pos, CACHE, HEAD_DIM)
    ref = ops_torch.apply_rope(q, k, pos, CACHE, HEAD_DIM)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


# --- limits ---------------------------------------------------------------------------------------------------------
def test_rope_rejects_odd_head_dim(rng):
    cache = torch.zeros(10, 5)
    with pytest.raises(ValueError, match=r"rope: head_dim=5; must be even"):
        run(
            rope.rope,
            randn(rng, (2, 10), torch.float32),
            randn(rng, (2, 5), torch.float32),
            torch.zeros(2, dtype=torch.int32),
            cache,
        )


def test_rope_rejects_q_width_not_a_multiple_of_head_dim(rng):
    with pytest.raises(ValueError, match=r"rope: q.shape\[1\]=200; must be a multiple of head_dim=128"):
        run(
            rope.rope,
            randn(rng, (2, 200), torch.float32),
            randn(rng, (2, 128), torch.float32),
            torch.zeros(2, dtype=torch.int32),
            CACHE,
        )


def test_rope_rejects_k_width_not_a_multiple_of_head_dim(rng):
    with pytest.raises(ValueError, match=r"rope: k.shape\[1\]=100; must be a multiple of head_dim=128"):
        run(
            rope.rope,
            randn(rng, (2, 128), torch.float32),
            randn(rng, (2, 100), torch.float32),
            torch.zeros(2, dtype=torch.int32),
            CACHE,
        )


def test_rope_rejects_mixed_q_k_dtypes(rng):
    with pytest.raises(ValueError, match=r"rope: k.dtype=.*must equal q.dtype"):
        run(
            rope.rope,
            randn(rng, (2, 128), torch.float32),
            randn(rng, (2, 128), torch.bfloat16),
            torch.zeros(2, dtype=torch.int32),
            CACHE,
        )


def test_rope_rejects_token_count_mismatch(rng):
    with pytest.raises(ValueError, match=r"rope: k.shape\[0\]=3; must equal q.shape\[0\]=2"):
        run(
            rope.rope,
            randn(rng, (2, 128), torch.float32),
            randn(rng, (3, 128), torch.float32),
            torch.zeros(2, dtype=torch.int32),
            CACHE,
        )


def test_rope_rejects_int64_positions(rng):
    # int64 is not an NKI dtype: the emulator refuses the argument before the kernel's own int32 check runs.
    with pytest.raises(ValueError, match=r"dtype.*int64"):
        run(
            rope.rope,
            randn(rng, (2, 128), torch.float32),
            randn(rng, (2, 128), torch.float32),
            torch.zeros(2, dtype=torch.int64),
            CACHE,
        )


def test_rope_rejects_position_beyond_the_cache(rng):
    pos = torch.tensor([0, POSITIONS], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"out of bounds"):
        run(rope.rope, randn(rng, (2, 128), torch.float32), randn(rng, (2, 128), torch.float32), pos, CACHE)


def test_rope_rejects_heads_too_wide_for_sbuf(rng):
    width = 128 * 200  # fp32: 25600 x 4 B x 3 tiles = 300 KB per partition
    with pytest.raises(ValueError, match=r"rope: heads x head_dim=25600 .* must fit 212728 B"):
        run(
            rope.rope,
            randn(rng, (1, width), torch.float32),
            randn(rng, (1, 128), torch.float32),
            torch.zeros(1, dtype=torch.int32),
            CACHE,
        )
