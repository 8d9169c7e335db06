"""kernels/linear_fp8.py: block-scaled FP8 projections against their fp32 reference and the model op's dequantizing
torch reference (ops.fp8.linear_fp8), the layout round trip, the op binding, and bad shapes."""

from __future__ import annotations

import pytest
import torch
from vllm_nki_moe.kernels import linear_fp8 as kernel

from nki_emulator import run
from vllm_nki_moe import ops
from vllm_nki_moe.ops import fp8
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close


def _weight(N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return fp8.quantize(torch.randn(N, K, generator=g) * K**-0.5)


def _dequantized(weight, scale_inv) -> torch.Tensor:
    """The weight as the checkpoint means it, in fp32 (no rounding to the activation dtype)."""
    return fp8.dequantize(weight, scale_inv, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "T,N,K",
    [
        (1, 1280, 2048),  # Qwen3-30B-A3B q/k/v at TP 4 (32 + 4 + 4 heads of 128 over 4 ranks), decode
        (4, 2048, 1024),  # its o projection at TP 4
        (3, 130, 256),  # a partial last output block
        (2, 200, 64),  # K below one block (tiny test models)
        (39, 256, 2048),  # more tokens than one PSUM tile holds at KT = 16 (32): two token tiles
        # from DEQUANTIZE_MIN_TOKENS on: the block dequantized in SBUF
        (40, 256, 2048),  # the first token count that takes it
        (131, 1280, 2048),  # q/k/v at TP 4, a prefill of 131 tokens
        (600, 130, 256),  # two PSUM token tiles (512 + 88) and a partial output block
        (45, 200, 64),  # K below one block
    ],
)
def test_linear_fp8_matches_the_exactly_dequantized_weight(T, N, K, dtype):
    weight, scale_inv = _weight(N, K)
    x = torch.randn(T, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    layout = kernel.linear_fp8_kernel_layout(weight, scale_inv)
    y, _ = run(kernel.linear_fp8, x, *layout)
    assert y.dtype == dtype and y.shape == (T, N)
    want = (x.float() @ _dequantized(weight, scale_inv).T).to(dtype)  # oracle from the model layout
    assert_close(y, want, "bfloat16_matmul" if dtype == torch.bfloat16 else "float32_matmul")
    # the kernel's own reference reads the kernel layout to the same numbers
    assert_close(kernel.linear_fp8_ref(x, *layout), want, "float32_matmul" if dtype == torch.float32 else "bfloat16")


def test_layout_round_trip_keeps_every_value_and_shape():
    weight, scale_inv = _weight(300, 384)
    wk, sk = kernel.linear_fp8_kernel_layout(weight, scale_inv)
    assert wk.shape == weight.shape and wk.dtype == torch.uint8 and sk.shape == scale_inv.shape
    values, scale = kernel.linear_fp8_model_layout(wk, sk)
    # trn2's values are the checkpoint's halved, its scales doubled: exact for normal numbers
    torch.testing.assert_close(values * 2, weight.float(), rtol=0, atol=2**-9)
    torch.testing.assert_close(scale, scale_inv * 2, rtol=0, atol=0)


@pytest.mark.parametrize("T", [2, kernel.DEQUANTIZE_MIN_TOKENS + 3])
def test_lnc2_grid_splits_the_output_blocks_and_matches_one_program(T):
    weight, scale_inv = _weight(384, 256)
    layout = kernel.linear_fp8_kernel_layout(weight, scale_inv)
    x = torch.randn(T, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    one, _ = run(kernel.linear_fp8, x, *layout)
    two, _ = run(kernel.linear_fp8[2], x, *layout)
    torch.testing.assert_close(two, one, rtol=0, atol=0)


def test_the_op_under_the_emulator_runs_the_kernel_on_model_and_prepared_weights():
    weight, scale_inv = _weight(130, 256)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3))
    emulated, reference = ops.bind("emulator"), ops.bind("torch")
    assert "linear_fp8" in emulated.kernel_ops
    want = reference.linear_fp8(x, weight, scale_inv)
    torch.testing.assert_close(emulated.linear_fp8(x, weight, scale_inv), want, rtol=1e-5, atol=1e-6)
    w, s = (torch.nn.Parameter(t, requires_grad=False) for t in (weight, scale_inv))
    fp8.prepare_linear_fp8_for_kernels(w, s)
    assert w.dtype == torch.uint8 and w.shape == (130, 256)  # one byte per weight, the model's shape
    torch.testing.assert_close(emulated.linear_fp8(x, w, s), want, rtol=1e-5, atol=1e-6)
    # the kernel's fallback (and any tool holding prepared weights) reads the kernel layout too
    torch.testing.assert_close(fp8.linear_fp8_any_layout(x, w, s), want, rtol=1e-5, atol=1e-6)


def test_shapes_the_kernel_cannot_take_are_named():
    weight, scale_inv = _weight(128, 200)
    assert "K=200" in fp8._linear_fp8_supports(torch.zeros(1, 200), weight, scale_inv)
    assert "float16" in fp8._linear_fp8_supports(torch.zeros(1, 128).half(), *_weight(128, 128))
    with pytest.raises(ValueError, match=r"linear_fp8_kernel_layout: K=200; must be < 128 or a multiple of 128"):
        kernel.linear_fp8_kernel_layout(weight, scale_inv)
    layout = kernel.linear_fp8_kernel_layout(*_weight(128, 256))
    with pytest.raises(ValueError, match=r"linear_fp8: x.dtype=.*float16; must be bfloat16 or float32"):
        run(kernel.linear_fp8, torch.zeros(1, 256, dtype=torch.float16), *layout)
    with pytest.raises(ValueError, match=r"linear_fp8: scale \(2, 2\)"):
        run(kernel.linear_fp8, torch.zeros(1, 256), layout[0], torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"linear_fp8: weight \(128, 256\) .*int8; must be uint8"):
        run(kernel.linear_fp8, torch.zeros(1, 256), layout[0].view(torch.int8), layout[1])
    strict = ops.bind("emulator")
    with pytest.raises(ValueError, match=r"linear_fp8: .*K=200"):
        strict.linear_fp8(torch.zeros(1, 200), weight, scale_inv)


def test_the_op_splits_long_inputs_into_calls_the_kernel_takes(monkeypatch):
    weight, scale_inv = _weight(128, 256)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(kernel, "X_SBUF_BYTES", 2 * 2 * 4)  # two tokens of fp32 x per call at K = 256
    assert kernel.max_tokens(256, 4) == 2
    with pytest.raises(ValueError, match=r"linear_fp8: T=5, K=256: x needs 40 B .*T <= 2"):
        run(kernel.linear_fp8, x, *kernel.linear_fp8_kernel_layout(weight, scale_inv))
    got = ops.bind("emulator").linear_fp8(x, weight, scale_inv)  # three calls: 2 + 2 + 1 tokens
    torch.testing.assert_close(got, fp8.linear_fp8(x, weight, scale_inv), rtol=1e-5, atol=1e-6)
