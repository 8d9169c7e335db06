"""kernels/silu_mul.py: silu(gate) * up against the op's torch reference (ops.moe.silu_mul), both layouts."""

from __future__ import annotations

import pytest
import torch
from vllm_nki_moe.kernels import silu_mul as kernel
from vllm_nki_moe.kernels.limits import PMAX

from nki_emulator import run
from vllm_nki_moe import ops
from vllm_nki_moe.ops import moe
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close, dtype_key

from .conftest import randn

DTYPES = [torch.bfloat16, torch.float32]
# (T, I): Llama-3.2-1B's 8192 and Qwen3-8B's 12288 per rank at TP 1/4 (decode and prefill), the spread layout's
# bounds (bf16 T = 32 spread, 33 rows), a ragged row tile and chunk, and odd widths the spread layout cannot take.
SHAPES = [(1, 8192), (1, 3072), (32, 2048), (33, 2048), (PMAX + 3, 2048 + 100), (5, 7), (1, 1), (200, 384)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,inter", SHAPES)
def test_silu_mul_matches_the_op_reference(T, inter, dtype, rng):
    gate_up = randn(rng, (T, 2 * inter), dtype, scale=3.0)
    out, _ = run(kernel.silu_mul, gate_up)
    assert out.shape == (T, inter) and out.dtype == dtype
    ref = moe.silu_mul(gate_up)  # torch's rounding: silu in the activation dtype, then the product
    assert_close(out, ref, dtype_key(dtype))
    if dtype == torch.float32:  # the hand formula, independent of torch's silu
        g, u = gate_up[:, :inter].double(), gate_up[:, inter:].double()
        torch.testing.assert_close(out.double(), g / (1 + torch.exp(-g)) * u, rtol=1e-5, atol=1e-6)


def test_the_layout_follows_the_token_count():
    assert kernel._use_spread_layout(1, 8192, 2) and kernel._use_spread_layout(32, 2048, 2)
    assert not kernel._use_spread_layout(33, 2048, 2)  # bf16: more than 64 B per partition and token
    assert not kernel._use_spread_layout(1, 100, 2)  # I % 128 != 0
    assert not kernel._use_spread_layout(16, 128 * 1024, 4)  # would not fit SBUF


def test_one_token_is_cheaper_spread_than_in_rows(rng):
    """The reason for the spread layout, in the cost model: one token's 8192 values on 128 lanes, not one."""
    gate_up = randn(rng, (1, 2 * 8192), torch.bfloat16)
    _, spread = run(kernel.silu_mul, gate_up)
    kernel_rows = kernel._use_spread_layout
    try:
        kernel._use_spread_layout = lambda *a: False
        _, rows = run(kernel.silu_mul, gate_up)
    finally:
        kernel._use_spread_layout = kernel_rows
    assert spread.estimated_seconds < rows.estimated_seconds / 2


@pytest.mark.parametrize(
    "shape, message", [((4, 7), "even, non-zero width"), ((8,), "must be 2-D"), ((0, 8), "T >= 1")]
)
def test_bad_shapes_are_named(shape, message, rng):
    with pytest.raises(ValueError, match=rf"silu_mul: .*{message}"):
        run(kernel.silu_mul, torch.zeros(shape, dtype=torch.bfloat16))


def test_the_op_runs_the_kernel_under_the_emulator_and_keeps_leading_dims(rng):
    opset = ops.bind("emulator")
    assert "silu_mul" in opset.kernel_ops
    gate_up = randn(rng, (2, 3, 2 * 256), torch.bfloat16)
    out = opset.silu_mul(gate_up)
    assert out.shape == (2, 3, 256)
    assert_close(out, moe.silu_mul(gate_up), "bfloat16")


def test_the_op_names_what_the_kernel_cannot_take():
    assert "even, non-zero width" in moe._silu_mul_supports(torch.zeros(3, 5))
    assert "float16" in moe._silu_mul_supports(torch.zeros(3, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"silu_mul: gate_up.dtype=torch.float16"):
        ops.bind("emulator").silu_mul(torch.zeros(3, 4, dtype=torch.float16))
