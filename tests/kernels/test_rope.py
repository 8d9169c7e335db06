"""kernels/rope.py: neox RoPE of q and k is bit-identical to rope_ops.apply_rope (Hugging Face's numerics); the fused
per-head q/k RMSNorm + RoPE (qk_norm_rope) matches its reference in both layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm_nki_moe.kernels import rmsnorm, rope
from vllm_nki_moe.kernels.limits import PMAX

from nki_emulator import run
from vllm_nki_moe import ops
from vllm_nki_moe.ops import norms
from vllm_nki_moe.ops import rope as rope_ops
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close, dtype_key

from .conftest import SEED, randn

THETA = 1e6  # Qwen3-30B-A3B rope_theta (config.json)
HEAD_DIM = 128
POSITIONS = 4096  # cache rows for the tests (the model builds max_position_embeddings rows)
QWEN3_30B_A3B_TP = {1: (32, 4), 4: (8, 1), 8: (4, 1)}  # tp -> (q heads, kv heads) per rank
TOKENS = [1, PMAX - 1, PMAX + 1]
DTYPES = [torch.bfloat16, torch.float32]
CACHE = rope_ops.rope_cos_sin_cache(HEAD_DIM, POSITIONS, THETA)


def _inputs(rng, T, hq, hk, D, dtype, positions=POSITIONS):
    q, k = randn(rng, (T, hq * D), dtype), randn(rng, (T, hk * D), dtype)
    pos = torch.from_numpy(rng.integers(0, positions, size=T)).to(torch.int64)
    return q, k, pos


def _check(q, k, pos, cache, D):
    (q_out, k_out), _ = run(rope.rope, q, k, pos.to(torch.int32), cache)
    q_ref, k_ref = rope_ops.apply_rope(q, k, pos, cache, D)
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
    cache = rope_ops.rope_cos_sin_cache(D, 300, 10000.0)
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
    ref = rope_ops.apply_rope(q, k, pos, CACHE, HEAD_DIM)
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


# --- qk_norm_rope: per-head q/k RMSNorm + RoPE in one kernel ---------------------------------------------------------
EPS = 1e-6  # Qwen3-30B-A3B rms_norm_eps (config.json)
QK_TOKENS = [1, 14, 32, 33, PMAX + 1]  # decode; one heads tile at TP=4; last heads count; first tokens count; ragged


def _weight(rng, n, dtype):
    return torch.from_numpy(1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).to(dtype)


def _qk_inputs(rng, T, hq, hk, dtype, D=HEAD_DIM):
    q, k, pos = _inputs(rng, T, hq, hk, D, dtype)
    return q, k, _weight(rng, D, dtype), _weight(rng, D, dtype), pos


def _check_qk(q, k, wq, wk, pos, dtype, **kw):
    (q_out, k_out), report = run(rope.qk_norm_rope, q, k, wq, wk, EPS, pos.to(torch.int32), CACHE, **kw)
    assert q_out.dtype == dtype and q_out.shape == q.shape and k_out.shape == k.shape
    ref = rope.qk_norm_rope_ref(q, k, wq, wk, EPS, pos.to(torch.int32), CACHE)
    assert_close((q_out, k_out), ref, dtype_key(dtype))
    return (q_out, k_out), report


@pytest.mark.parametrize("layout", ["auto", "heads", "tokens"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", sorted(QWEN3_30B_A3B_TP))
@pytest.mark.parametrize("T", QK_TOKENS)
def test_qk_norm_rope_matches_ref_qwen3_30b_a3b_per_rank(T, tp, dtype, layout, rng):
    hq, hk = QWEN3_30B_A3B_TP[tp]
    _check_qk(*_qk_inputs(rng, T, hq, hk, dtype), dtype, layout=layout)


@pytest.mark.parametrize("layout", ["heads", "tokens"])
@pytest.mark.parametrize("T", [1, 5, PMAX + 1])
def test_qk_norm_rope_bf16_is_bit_identical_to_rms_norm_then_apply_rope(T, layout, rng):
    """bf16: the same rounding points as ops.norms.rms_norm followed by apply_rope (Hugging Face's order)."""
    q, k, wq, wk, pos = _qk_inputs(rng, T, 8, 1, torch.bfloat16)
    out, _ = _check_qk(q, k, wq, wk, pos, torch.bfloat16, layout=layout)
    ref = rope_ops.qk_norm_rope(q, k, wq, wk, EPS, pos, CACHE, HEAD_DIM)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_torch_qk_norm_rope_is_rms_norm_then_apply_rope_bit_for_bit(dtype, rng):
    q, k, wq, wk, pos = _qk_inputs(rng, 7, 8, 1, dtype)
    qn = norms.rms_norm(q.view(7, 8, HEAD_DIM), wq, EPS).reshape(q.shape)
    kn = norms.rms_norm(k.view(7, 1, HEAD_DIM), wk, EPS).reshape(k.shape)
    expected = rope_ops.apply_rope(qn, kn, pos, CACHE, HEAD_DIM)
    got = rope_ops.qk_norm_rope(q, k, wq, wk, EPS, pos, CACHE, HEAD_DIM)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 140), hq=st.integers(1, 6), hk=st.integers(1, 3), half=st.integers(1, 40), bf16=st.booleans())
def test_qk_norm_rope_matches_ref_any_shape(T, hq, hk, half, bf16):
    rng = np.random.default_rng(SEED)
    D = 2 * half
    cache = rope_ops.rope_cos_sin_cache(D, 300, 10000.0)
    dtype = torch.bfloat16 if bf16 else torch.float32
    q, k, pos = _inputs(rng, T, hq, hk, D, dtype, positions=300)
    wq, wk = _weight(rng, D, dtype), _weight(rng, D, dtype)
    out, _ = run(rope.qk_norm_rope, q, k, wq, wk, EPS, pos.to(torch.int32), cache)
    assert_close(out, rope.qk_norm_rope_ref(q, k, wq, wk, EPS, pos.to(torch.int32), cache), dtype_key(dtype))


@pytest.mark.parametrize("T,layout", [(1, "heads"), (32, "heads"), (33, "tokens"), (PMAX + 1, "tokens")])
def test_qk_norm_rope_auto_takes_the_documented_layout(T, layout, rng):
    q, k, wq, wk, pos = _qk_inputs(rng, T, 8, 1, torch.bfloat16)
    _, auto = _check_qk(q, k, wq, wk, pos, torch.bfloat16)
    _, forced = _check_qk(q, k, wq, wk, pos, torch.bfloat16, layout=layout)
    assert auto.ops == forced.ops and auto.estimated_seconds == forced.estimated_seconds


def test_qk_norm_rope_decode_beats_the_three_separate_kernels(rng):
    """Cost model, TP=4 T=1 bf16: one qk_norm_rope is cheaper than q_norm + k_norm + rope."""
    q, k, wq, wk, pos = _qk_inputs(rng, 1, 8, 1, torch.bfloat16)
    _, fused = _check_qk(q, k, wq, wk, pos, torch.bfloat16)
    reports = [run(rmsnorm.rms_norm, t.view(-1, HEAD_DIM), w, EPS)[1] for t, w in ((q, wq), (k, wk))]
    reports.append(run(rope.rope, q, k, pos.to(torch.int32), CACHE)[1])
    # engines' work 3x less; with each kernel's load -> compute -> store chain, one chain instead of three: 2x
    assert fused.engine_bound_seconds * 3 < sum(r.engine_bound_seconds for r in reports)
    assert fused.estimated_seconds * 2 < sum(r.estimated_seconds for r in reports)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_qk_norm_rope_runs_the_kernel_and_matches_torch(dtype, rng):
    opset = ops.bind("emulator")
    assert "qk_norm_rope" in opset.kernel_ops
    q, k, wq, wk, pos = _qk_inputs(rng, 3, 4, 1, dtype)
    got = opset.qk_norm_rope(q, k, wq, wk, EPS, pos, CACHE, HEAD_DIM)
    assert_close(got, rope_ops.qk_norm_rope(q, k, wq, wk, EPS, pos, CACHE, HEAD_DIM), dtype_key(dtype))


def test_ops_qk_norm_rope_explicit_backend_raises_the_unsupported_reason(rng):
    opset = ops.bind("emulator")
    q, k, wq, wk, pos = _qk_inputs(rng, 2, 4, 1, torch.bfloat16)
    with pytest.raises(ValueError, match=r"qk_norm_rope: q_weight \(128,\) torch.float32; must be \(128,\)"):
        opset.qk_norm_rope(q, k, wq.float(), wk, EPS, pos, CACHE, HEAD_DIM)


# --- qk_norm_rope limits (the rope limits are shared: _check_rope_args, tested above) --------------------------------
def _qk_args(rng, T=2, hq=1, hk=1, D=HEAD_DIM):
    q, k, wq, wk, pos = _qk_inputs(rng, T, hq, hk, torch.float32, D)
    return [q, k, wq, wk, EPS, pos.to(torch.int32), CACHE]


def test_qk_norm_rope_rejects_q_weight_of_wrong_size(rng):
    args = _qk_args(rng)
    args[2] = _weight(rng, 64, torch.float32)
    with pytest.raises(ValueError, match=r"qk_norm_rope: q_weight.shape=\(64,\); must be \(128,\)"):
        run(rope.qk_norm_rope, *args)


def test_qk_norm_rope_rejects_k_weight_of_wrong_size(rng):
    args = _qk_args(rng)
    args[3] = _weight(rng, 129, torch.float32)
    with pytest.raises(ValueError, match=r"qk_norm_rope: k_weight.shape=\(129,\); must be \(128,\)"):
        run(rope.qk_norm_rope, *args)


def test_qk_norm_rope_rejects_non_positive_eps(rng):
    args = _qk_args(rng)
    args[4] = 0.0
    with pytest.raises(ValueError, match=r"qk_norm_rope: eps=0.0; must be > 0"):
        run(rope.qk_norm_rope, *args)


def test_qk_norm_rope_rejects_unknown_layout(rng):
    with pytest.raises(ValueError, match=r"qk_norm_rope: layout='rows'; must be one of auto, heads, tokens"):
        run(rope.qk_norm_rope, *_qk_args(rng), layout="rows")


def test_qk_norm_rope_rejects_heads_layout_with_more_than_128_heads_per_token(rng):
    args = _qk_args(rng, T=1, hq=129, hk=1, D=2)  # head_dim 2 keeps the SBUF check quiet
    args[6] = rope_ops.rope_cos_sin_cache(2, 10, THETA)
    with pytest.raises(ValueError, match=r"qk_norm_rope: q heads \+ k heads=130; layout='heads' needs <= 128"):
        run(rope.qk_norm_rope, *args, layout="heads")


def test_qk_norm_rope_rejects_odd_head_dim(rng):
    args = _qk_args(rng)
    args[6] = torch.zeros(10, 5)
    with pytest.raises(ValueError, match=r"qk_norm_rope: head_dim=5; must be even"):
        run(rope.qk_norm_rope, *args)


def test_qk_norm_rope_rejects_heads_too_wide_for_sbuf(rng):
    with pytest.raises(ValueError, match=r"qk_norm_rope: heads x head_dim=12800 .* must fit 212728 B"):
        run(rope.qk_norm_rope, *_qk_args(rng, T=1, hq=100, hk=1))
