"""kernels/linear.py: the dense projection matches its reference and ``torch.nn.functional.linear``, streams the weight
once, and refuses shapes it cannot take with the rule it breaks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from vllm_nki_moe.kernels import linear

from nki_emulator import run
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close

from .conftest import randn

# Qwen3-30B-A3B per rank (hidden 2048, 32 q / 4 kv heads of 128, vocab 151,936), TP 1 / 4 / 8:
#   qkv_proj N = (q + 2 kv) * 128, o_proj K = q * 128, lm_head N = ceil(151936 / tp) (its N tiles, not all rows).
QWEN3_30B_A3B = {
    "qkv_proj tp1": (2048, (32 + 8) * 128),
    "qkv_proj tp4": (2048, (8 + 2) * 128),
    "qkv_proj tp8": (2048, (4 + 2) * 128),  # kv heads replicated: one per rank
    "o_proj tp4": (8 * 128, 2048),
    "o_proj tp8": (4 * 128, 2048),
}
TOKENS = [1, 7, 131]  # a decode row, a ragged batch, a full token tile plus a ragged one
# N below, at and across the 512-column tile; K under one partition tile (64, 96) and split in equal tiles (200)
ODD = [(128, 1), (384, 130), (256, 1000), (128, 513), (64, 7), (96, 512), (200, 33)]


def _tolerance(dtype):
    return "float32_matmul" if dtype == torch.float32 else "bfloat16"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("name", list(QWEN3_30B_A3B))
def test_linear_matches_torch_at_qwen3_30b_a3b_shapes(name, T, dtype, rng):
    K, N = QWEN3_30B_A3B[name]
    x, weight = randn(rng, (T, K), dtype), randn(rng, (N, K), dtype, scale=K**-0.5)
    out, _ = run(linear.linear, x, linear.linear_kernel_layout(weight))
    assert out.shape == (T, N) and out.dtype == dtype
    assert_close(out, linear.linear_ref(x, linear.linear_kernel_layout(weight)), _tolerance(dtype))
    assert_close(out, F.linear(x.float(), weight.float()).to(dtype), _tolerance(dtype))


@pytest.mark.parametrize("T", [1, 512])
@pytest.mark.parametrize("K, N", ODD)
def test_linear_odd_sizes_and_a_512_token_prefill(K, N, T, rng):
    x, weight = randn(rng, (T, K), torch.float32), randn(rng, (N, K), torch.float32, scale=K**-0.5)
    out, _ = run(linear.linear, x, linear.linear_kernel_layout(weight))
    assert_close(out, F.linear(x, weight), "float32_matmul")


@pytest.mark.parametrize("T", [1, 131, 512])
def test_the_weight_is_read_from_hbm_once_whatever_the_token_count(T, rng):
    K, N = 512, 1100
    x, weight = randn(rng, (T, K), torch.bfloat16), randn(rng, (N, K), torch.bfloat16)
    _, report = run(linear.linear, x, linear.linear_kernel_layout(weight))
    assert report.hbm_read_bytes == (T * K + K * N) * 2  # x once, W once
    assert report.hbm_write_bytes == T * N * 2
    assert report.macs == T * K * N


def test_a_column_major_weight_is_the_kernel_layout_without_a_copy():
    weight = torch.randn(300, 256).t().contiguous().t()  # [N, K] stored column-major
    assert linear.linear_kernel_layout(weight).data_ptr() == weight.data_ptr()


@pytest.mark.parametrize(
    "x_shape, w_shape, dtypes, message",
    [
        ((4, 257), (257, 64), (torch.float32, torch.float32), "K=257; must split into ceil(K/128)=3 equal"),
        ((4, 256), (128, 64), (torch.float32, torch.float32), "weight_t.shape=(128, 64); must be [K=256, N >= 1]"),
        ((4, 256), (256, 64), (torch.float32, torch.bfloat16), "weight_t.dtype="),
        ((4, 2, 128), (128, 64), (torch.float32, torch.float32), "x.shape=(4, 2, 128); must be 2-D"),
    ],
)
def test_bad_input_names_the_rule(x_shape, w_shape, dtypes, message):
    x, w = torch.zeros(x_shape, dtype=dtypes[0]), torch.zeros(w_shape, dtype=dtypes[1])
    with pytest.raises(ValueError, match=r"^linear: ") as err:
        run(linear.linear, x, w)
    assert message in str(err.value)


@pytest.mark.parametrize("N", [1, 130, 1280, 1025])  # fewer columns than programs, uneven shares, several tiles
def test_two_programs_give_the_same_output_each_reading_half_the_weight(N, rng):
    K, T = 256, 3
    x, weight = randn(rng, (T, K), torch.bfloat16), randn(rng, (N, K), torch.bfloat16, scale=K**-0.5)
    wt = linear.linear_kernel_layout(weight)
    one, one_report = run(linear.linear, x, wt)
    two, two_report = run(linear.linear[2], x, wt)
    assert torch.equal(one, two)  # each column is the same K-sum in the same order
    assert two_report.num_programs == 2
    assert two_report.hbm_read_bytes == one_report.hbm_read_bytes + T * K * 2  # x read by both, W split
    if N >= 2 * linear.N_TILE:  # each core's weight stream is half as long (the load -> matmul -> store chain is not)
        assert two_report.engine_bound_seconds < 0.6 * one_report.engine_bound_seconds
