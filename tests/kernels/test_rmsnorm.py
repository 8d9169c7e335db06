"""kernels/rmsnorm.py: rms_norm and fused_add_rms_norm match their references (and Hugging Face's rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm_nki_moe.kernels import rmsnorm
from vllm_nki_moe.kernels.limits import PMAX

from nki_emulator import run
from vllm_nki_moe import ops
from vllm_nki_moe.ops import norms
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close, dtype_key

from .conftest import SEED, randn

EPS = 1e-6  # Qwen3-30B-A3B rms_norm_eps (config.json)
DTYPES = [torch.bfloat16, torch.float32]
# Qwen3-30B-A3B (config.json: hidden 2048, 32 q / 4 kv heads, head_dim 128) per TP rank: the layer norms see
# [T, 2048] at every TP; the q/k norms see [T * heads_per_rank, 128].
QWEN3_30B_A3B_TP = {1: (32, 4), 4: (8, 1), 8: (4, 1)}  # tp -> (q heads, kv heads) per rank
HIDDEN, HEAD_DIM = 2048, 128
TOKENS = [1, PMAX - 1, PMAX + 1]  # one token, just under one tile, one tile plus a ragged tail
ODD_SIZES = [(7, 769), (130, 83), (3, 1)]  # hidden sizes that are not multiples of anything


def _weight(rng, n, dtype):
    return torch.from_numpy(1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).to(dtype)


def _check_rms(T, H, dtype, rng):
    x, w = randn(rng, (T, H), dtype), _weight(rng, H, dtype)
    out, _ = run(rmsnorm.rms_norm, x, w, EPS)
    assert out.dtype == dtype and out.shape == (T, H)
    assert_close(out, rmsnorm.rms_norm_ref(x, w, EPS), dtype_key(dtype))
    return x, w, out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
def test_rms_norm_matches_ref_qwen3_30b_a3b_hidden(T, dtype, rng):
    _check_rms(T, HIDDEN, dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", sorted(QWEN3_30B_A3B_TP))
@pytest.mark.parametrize("T", [1, 33])
def test_rms_norm_matches_ref_qwen3_30b_a3b_qk_norm_per_rank(T, tp, dtype, rng):
    q_heads, kv_heads = QWEN3_30B_A3B_TP[tp]
    _check_rms(T * q_heads, HEAD_DIM, dtype, rng)
    _check_rms(T * kv_heads, HEAD_DIM, dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", ODD_SIZES)
def test_rms_norm_matches_ref_odd_sizes(T, H, dtype, rng):
    _check_rms(T, H, dtype, rng)


@pytest.mark.parametrize("T", TOKENS)
def test_rms_norm_bf16_is_bit_identical_to_hf_rounding(T, rng):
    """bf16: the normalised value is rounded before the weight multiply, exactly as ops.norms.rms_norm / HF do."""
    x, w, out = _check_rms(T, HIDDEN, torch.bfloat16, rng)
    assert torch.equal(out, norms.rms_norm(x, w, EPS))


@pytest.mark.parametrize("layout", ["rows", "h"])
@pytest.mark.parametrize("T", [1, 5, PMAX + 1])
def test_rms_norm_can_round_once_as_nxdis_custom_rmsnorm(T, layout, rng):
    """round_normed=False: fp32 until the weight multiply, one cast at the end, as NxDI's CustomRMSNorm
    (modules/custom_calls.py: x.to(float32), RmsNorm, result.to(original dtype)): bit for bit in bf16 against that
    math, and not HF's rounding (which rounds the normalised value first)."""
    x, w = randn(rng, (T, HIDDEN), torch.bfloat16), _weight(rng, HIDDEN, torch.bfloat16)
    out, _ = run(rmsnorm.rms_norm, x, w, EPS, layout, False)
    x32 = x.float()
    nxdi = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS) * w.float()).to(torch.bfloat16)
    assert_close(out, nxdi, "bfloat16")
    assert (out != nxdi).float().mean() < 0.01  # rsqrt and summation order aside, the same bits
    assert torch.equal(rmsnorm.rms_norm_ref(x, w, EPS, layout, False), nxdi)
    assert not torch.equal(rmsnorm.rms_norm_ref(x, w, EPS), nxdi)  # the two roundings differ at these sizes


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 300), H=st.integers(1, 600), bf16=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_rms_norm_matches_ref_any_shape(T, H, bf16, scale):
    rng = np.random.default_rng(SEED)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, w = randn(rng, (T, H), dtype, scale), _weight(rng, H, dtype)
    out, _ = run(rmsnorm.rms_norm, x, w, EPS)
    assert_close(out, rmsnorm.rms_norm_ref(x, w, EPS), dtype_key(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, HIDDEN), (PMAX - 1, HIDDEN), (PMAX + 1, HIDDEN), (5, 769)])
def test_fused_add_rms_norm_matches_ref(T, H, dtype, rng):
    x, r, w = randn(rng, (T, H), dtype), randn(rng, (T, H), dtype), _weight(rng, H, dtype)
    (out, new_res), _ = run(rmsnorm.fused_add_rms_norm, x, r, w, EPS)
    ref_out, ref_res = rmsnorm.fused_add_rms_norm_ref(x, r, w, EPS)
    assert torch.equal(new_res, ref_res)  # one add, rounded once: bit exact
    assert_close(out, ref_out, dtype_key(dtype))
    if dtype == torch.bfloat16:
        hf_out, hf_res = norms.fused_add_rms_norm(x, r, w, EPS)
        assert torch.equal(out, hf_out) and torch.equal(new_res, hf_res)


def test_rms_norm_reads_the_weight_from_hbm_once(rng):
    T, H = PMAX + 1, HIDDEN
    x, w = randn(rng, (T, H), torch.bfloat16), _weight(rng, H, torch.bfloat16)
    _, report = run(rmsnorm.rms_norm, x, w, EPS)
    assert report.hbm_read_bytes == T * H * 2 + H * 2
    assert report.hbm_write_bytes == T * H * 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_rms_norm_takes_tokens_by_heads_and_matches_torch(dtype, rng):
    opset = ops.bind("emulator")
    assert {"rms_norm", "fused_add_rms_norm"} <= set(opset.kernel_ops)
    x, w = randn(rng, (3, 8, HEAD_DIM), dtype), _weight(rng, HEAD_DIM, dtype)
    out = opset.rms_norm(x, w, EPS)
    assert out.shape == x.shape
    assert_close(out, norms.rms_norm(x, w, EPS), dtype_key(dtype))
    r = randn(rng, (3, 8, HEAD_DIM), dtype)
    got = opset.fused_add_rms_norm(x, r, w, EPS)
    assert_close(got, norms.fused_add_rms_norm(x, r, w, EPS), dtype_key(dtype))


def test_ops_rms_norm_explicit_backend_raises_the_unsupported_reason(rng):
    opset = ops.bind("emulator")
    x, w = randn(rng, (2, 16), torch.bfloat16), _weight(rng, 16, torch.float32)
    with pytest.raises(ValueError, match=r"rms_norm: weight.dtype=torch.float32"):
        opset.rms_norm(x, w, EPS)


# --- limits: each one the docstrings state must raise ------------------------------------------------------------
def test_rms_norm_rejects_3d_input(rng):
    with pytest.raises(ValueError, match=r"rms_norm: x.shape=\(2, 3, 4\); must be 2-D"):
        run(rmsnorm.rms_norm, randn(rng, (2, 3, 4), torch.float32), _weight(rng, 4, torch.float32), EPS)


def test_rms_norm_rejects_weight_of_wrong_size(rng):
    with pytest.raises(ValueError, match=r"rms_norm: weight.shape=\(5,\); must be \(4,\)"):
        run(rmsnorm.rms_norm, randn(rng, (2, 4), torch.float32), _weight(rng, 5, torch.float32), EPS)


def test_rms_norm_rejects_non_positive_eps(rng):
    with pytest.raises(ValueError, match=r"rms_norm: eps=0.0; must be > 0"):
        run(rmsnorm.rms_norm, randn(rng, (2, 4), torch.float32), _weight(rng, 4, torch.float32), 0.0)


def test_rms_norm_rejects_hidden_too_large_for_sbuf(rng):
    H = 20000  # fp32: 20000 x (3 x 4 + 4) B = 320 KB per partition > limits.SBUF_PARTITION_BYTES
    with pytest.raises(ValueError, match=r"rms_norm: H=20000 .* must fit 212728 B"):
        run(rmsnorm.rms_norm, randn(rng, (1, H), torch.float32), _weight(rng, H, torch.float32), EPS)


def test_fused_add_rms_norm_rejects_residual_shape_mismatch(rng):
    x, r = randn(rng, (2, 4), torch.float32), randn(rng, (3, 4), torch.float32)
    with pytest.raises(ValueError, match=r"fused_add_rms_norm: residual.shape=\(3, 4\); must equal"):
        run(rmsnorm.fused_add_rms_norm, x, r, _weight(rng, 4, torch.float32), EPS)


def test_fused_add_rms_norm_rejects_residual_dtype_mismatch(rng):
    x, r = randn(rng, (2, 4), torch.float32), randn(rng, (2, 4), torch.bfloat16)
    with pytest.raises(ValueError, match=r"fused_add_rms_norm: residual.dtype=.*must equal x.dtype"):
        run(rmsnorm.fused_add_rms_norm, x, r, _weight(rng, 4, torch.float32), EPS)


# --- layouts: H on partitions for few tokens (decode), rows for many ------------------------------------------------
LAYOUT_SIZES = [(1, HIDDEN), (2, HIDDEN), (32, HIDDEN), (33, HIDDEN), (PMAX + 1, HIDDEN), (3, 512), (5, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", LAYOUT_SIZES)
def test_rms_norm_h_layout_matches_ref(T, H, dtype, rng):
    x, w = randn(rng, (T, H), dtype), _weight(rng, H, dtype)
    out, _ = run(rmsnorm.rms_norm, x, w, EPS, layout="h")
    assert out.dtype == dtype and out.shape == (T, H)
    assert_close(out, rmsnorm.rms_norm_ref(x, w, EPS), dtype_key(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", LAYOUT_SIZES)
def test_fused_add_rms_norm_h_layout_matches_ref(T, H, dtype, rng):
    x, r, w = randn(rng, (T, H), dtype), randn(rng, (T, H), dtype), _weight(rng, H, dtype)
    (out, new_res), _ = run(rmsnorm.fused_add_rms_norm, x, r, w, EPS, layout="h")
    ref_out, ref_res = rmsnorm.fused_add_rms_norm_ref(x, r, w, EPS)
    assert torch.equal(new_res, ref_res)
    assert_close(out, ref_out, dtype_key(dtype))


def test_rms_norm_h_layout_bf16_decode_is_bit_identical_to_hf_rounding(rng):
    x, r, w = (
        randn(rng, (1, HIDDEN), torch.bfloat16),
        randn(rng, (1, HIDDEN), torch.bfloat16),
        _weight(rng, HIDDEN, torch.bfloat16),
    )
    (out, new_res), _ = run(rmsnorm.fused_add_rms_norm, x, r, w, EPS, layout="h")
    hf_out, hf_res = norms.fused_add_rms_norm(x, r, w, EPS)
    assert torch.equal(out, hf_out) and torch.equal(new_res, hf_res)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 70), tiles=st.integers(1, 20), bf16=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_rms_norm_h_layout_matches_ref_any_shape(T, tiles, bf16, scale):
    rng = np.random.default_rng(SEED)
    dtype = torch.bfloat16 if bf16 else torch.float32
    H = tiles * PMAX
    x, w = randn(rng, (T, H), dtype, scale), _weight(rng, H, dtype)
    out, _ = run(rmsnorm.rms_norm, x, w, EPS, layout="h")
    assert_close(out, rmsnorm.rms_norm_ref(x, w, EPS), dtype_key(dtype))


@pytest.mark.parametrize(
    "T,H,dtype,layout",
    [
        (1, HIDDEN, torch.bfloat16, "h"),  # decode
        (32, HIDDEN, torch.bfloat16, "h"),  # the last bf16 token count on h (64 B of tokens per partition)
        (33, HIDDEN, torch.bfloat16, "rows"),
        (16, HIDDEN, torch.float32, "h"),
        (17, HIDDEN, torch.float32, "rows"),
        (8, HEAD_DIM, torch.bfloat16, "rows"),  # H < H_LAYOUT_MIN_H: the q/k norms stay on rows
        (1, 769, torch.bfloat16, "rows"),  # H not a multiple of 128
    ],
)
def test_fused_add_rms_norm_auto_takes_the_documented_layout(T, H, dtype, layout, rng):
    x, r, w = randn(rng, (T, H), dtype), randn(rng, (T, H), dtype), _weight(rng, H, dtype)
    _, auto = run(rmsnorm.fused_add_rms_norm, x, r, w, EPS)
    _, forced = run(rmsnorm.fused_add_rms_norm, x, r, w, EPS, layout=layout)
    assert auto.ops == forced.ops and auto.estimated_seconds == forced.estimated_seconds


def test_fused_add_rms_norm_decode_is_at_least_10x_faster_on_the_h_layout(rng):
    """The reason for the h layout (cost model): T=1, H=2048 bf16 is 3.52 us of Scalar work on rows; with the
    dependency chain (load, reduce, scale, store) both take longer, the h layout still about 4x less."""
    x, r, w = (
        randn(rng, (1, HIDDEN), torch.bfloat16),
        randn(rng, (1, HIDDEN), torch.bfloat16),
        _weight(rng, HIDDEN, torch.bfloat16),
    )
    _, h = run(rmsnorm.fused_add_rms_norm, x, r, w, EPS, layout="h")
    _, rows = run(rmsnorm.fused_add_rms_norm, x, r, w, EPS, layout="rows")
    assert h.engine_bound_seconds * 10 < rows.engine_bound_seconds
    assert h.estimated_seconds * 4 < rows.estimated_seconds
    assert h.hbm_read_bytes == rows.hbm_read_bytes == 2 * HIDDEN * 2 + HIDDEN * 2  # x, residual, weight once


def test_rms_norm_rejects_unknown_layout(rng):
    with pytest.raises(ValueError, match=r"rms_norm: layout='cols'; must be one of auto, rows, h"):
        run(rmsnorm.rms_norm, randn(rng, (2, 256), torch.float32), _weight(rng, 256, torch.float32), EPS, layout="cols")


def test_fused_add_rms_norm_rejects_h_layout_for_hidden_not_a_multiple_of_128(rng):
    x, r = randn(rng, (2, 200), torch.float32), randn(rng, (2, 200), torch.float32)
    with pytest.raises(ValueError, match=r"fused_add_rms_norm: H=200; layout='h' needs H % 128 == 0"):
        run(rmsnorm.fused_add_rms_norm, x, r, _weight(rng, 200, torch.float32), EPS, layout="h")
