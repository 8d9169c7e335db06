"""kernels/moe_fp8.py: FP8 experts for decode against their fp32 reference, the host conversion to trn2's FP8 format,
and the model op (ops.fp8.moe_experts_fp8) on the kernel against its dequantizing torch reference."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from vllm_nki_moe.kernels import moe_fp8

from nki_emulator import run
from vllm_nki_moe import ops
from vllm_nki_moe.ops import fp8
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close


def _experts(E: int, H: int, inter: int, seed: int = 0):
    """Model-layout FP8 experts (ops.fp8.quantize_experts: gate, up, down quantized separately, scales along I)."""
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * inter, H, generator=g) * H**-0.5
    return fp8.quantize_experts(w13, torch.randn(E, H, inter, generator=g) * inter**-0.5)


def _routing(T: int, E: int, K: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    w = torch.rand(T, K, generator=g) + 0.1
    return w / w.sum(-1, keepdim=True), ids


def test_trn2_conversion_halves_values_exactly_and_doubles_scales():
    q = torch.tensor([448.0, -240.0, 1.0, 0.015625, 2**-9, 3 * 2**-9]).to(fp8.FP8_DTYPE)
    bits, scales = moe_fp8.to_trn2_fp8(q, torch.tensor([0.5]))
    values = bits.numpy().view(ml_dtypes.float8_e4m3).astype(np.float32)
    # normals halve exactly; the odd-mantissa subnormals round to even (the documented loss)
    assert values.tolist()[:4] == [224.0, -120.0, 0.5, 0.0078125]
    assert values[4] in (0.0, 2**-9) and values[5] in (2**-9, 2 * 2**-9)
    assert np.abs(values).max() <= moe_fp8.TRN2_FP8_MAX and scales.tolist() == [1.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "T,E,K,H,inter",
    [
        (1, 16, 8, 2048, 192),  # Qwen3-30B-A3B at TP 4 per rank (hidden 2048, 768/4 rows), fewer experts
        (3, 8, 2, 256, 64),  # one intermediate tile, two scale blocks
        (5, 6, 3, 128, 200),  # I split into two 100-row tiles: scale rows cross the tile boundary
    ],
)
def test_moe_decode_fp8_matches_its_reference(T, E, K, H, inter, dtype):
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(2)).to(dtype)
    weights, ids = _routing(T, E, K)
    layout = moe_fp8.fp8_experts_kernel_layout(*_experts(E, H, inter))
    out, _ = run(moe_fp8.moe_decode_fp8, x, *layout, weights, ids)
    assert out.dtype == dtype and out.shape == (T, H)
    key = "bfloat16_matmul" if dtype == torch.bfloat16 else "float32_matmul"
    assert_close(out, moe_fp8.moe_decode_fp8_ref(x, *layout, weights, ids), key)


def test_the_reference_reads_the_layout_as_the_model_does():
    """The kernel reference (from the kernel layout) and the model op's reference (from the model layout) agree:
    the layout and the trn2 conversion lose nothing above the subnormals."""
    E, H, inter, T, K = 4, 256, 96, 2, 2
    experts = _experts(E, H, inter)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(4))
    weights, ids = _routing(T, E, K)
    ours = moe_fp8.moe_decode_fp8_ref(x, *moe_fp8.fp8_experts_kernel_layout(*experts), weights, ids)
    torch.testing.assert_close(ours, fp8.moe_experts_fp8(x, *experts, weights, ids.long()), rtol=1e-4, atol=1e-5)


def test_lnc2_grid_splits_the_slots_and_matches_one_program():
    E, H, inter, T, K = 8, 256, 64, 2, 3
    layout = moe_fp8.fp8_experts_kernel_layout(*_experts(E, H, inter))
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    weights, ids = _routing(T, E, K)
    one, _ = run(moe_fp8.moe_decode_fp8, x, *layout, weights, ids)
    two, _ = run(moe_fp8.moe_decode_fp8[2], x, *layout, weights, ids)
    assert_close(two, one, "bfloat16_matmul")


def test_prepared_experts_keep_one_byte_per_weight_and_any_layout_reads_them():
    E, H, inter, T, K = 4, 128, 64, 3, 2
    experts = [torch.nn.Parameter(t, requires_grad=False) for t in _experts(E, H, inter)]
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(7))
    weights, ids = _routing(T, E, K)
    before = fp8.moe_experts_fp8(x, *experts, weights, ids.long())
    fp8.prepare_fp8_experts_for_kernels(*experts)
    assert experts[0].dtype == torch.uint8 and experts[0].numel() == E * 2 * inter * H
    after = fp8.moe_experts_fp8_any_layout(x, *experts, weights, ids.long())
    # equal but for the trn2 conversion's rounding of odd subnormals (moe_fp8.to_trn2_fp8): ~1e-6 absolute here
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def _block_inputs(T, E, H, dtype, seed=8):
    g = torch.Generator().manual_seed(seed)
    hidden, residual = (torch.randn(T, H, generator=g).to(dtype) for _ in range(2))
    gamma = (torch.rand(H, generator=g) + 0.5).to(dtype)
    gate_t = (torch.randn(E, H, generator=g) * H**-0.5).to(dtype).t()  # the prepared router weight, [H, E] view
    return hidden, residual, gamma, gate_t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "T,E,K,H,inter,norm",
    [
        (1, 16, 8, 2048, 192, True),  # Qwen3-30B-A3B per rank at TP 4 (fewer experts), norm_topk_prob
        (3, 8, 2, 256, 64, False),
        (2, 12, 3, 128, 200, True),  # I in two 100-row tiles
    ],
)
def test_moe_block_decode_fp8_matches_norm_router_and_fp8_experts(T, E, K, H, inter, norm, dtype):
    hidden, residual, gamma, gate_t = _block_inputs(T, E, H, dtype)
    layout = moe_fp8.fp8_experts_kernel_layout(*_experts(E, H, inter))
    args = (hidden, residual, gamma, gate_t, *layout, 1e-6, K, norm)
    (out, r), _ = run(moe_fp8.moe_block_decode_fp8, *args)
    want_out, want_r = moe_fp8.moe_block_decode_fp8_ref(*args)
    assert torch.equal(r, want_r)  # the residual sum, rounded as the model rounds
    assert_close(out, want_out, "bfloat16_matmul" if dtype == torch.bfloat16 else "float32_matmul")
    (two, r2), _ = run(moe_fp8.moe_block_decode_fp8[2], *args)
    assert torch.equal(r2, r)
    assert_close(two, out, "bfloat16_matmul" if dtype == torch.bfloat16 else "float32_matmul")


def test_the_fused_fp8_block_routes_as_the_models_ops():
    """Its norm + router + experts equal the model's sequence (fused_add_rms_norm, router_gate_topk, the FP8 experts
    op) in float32."""
    T, E, K, H, inter = 2, 8, 2, 256, 64
    hidden, residual, gamma, gate_t = _block_inputs(T, E, H, torch.float32, seed=9)
    experts = _experts(E, H, inter, seed=10)
    sequence = ops.bind("torch").moe_block_fp8(hidden, residual, gamma, 1e-6, gate_t.t(), *experts, K, True)
    (out, r), _ = run(
        moe_fp8.moe_block_decode_fp8,
        hidden,
        residual,
        gamma,
        gate_t,
        *moe_fp8.fp8_experts_kernel_layout(*experts),
        1e-6,
        K,
        True,
    )
    torch.testing.assert_close(r, sequence[1], rtol=0, atol=0)
    torch.testing.assert_close(out, sequence[0], rtol=1e-4, atol=1e-5)


def test_shapes_the_kernel_cannot_take_are_named():
    x = torch.zeros(1, 200)
    w13, s13, w2, s2 = (torch.zeros(1, 4, 200, dtype=fp8.FP8_DTYPE), torch.zeros(1, 4, 2), None, None)
    assert "H=200; the kernel needs a multiple of 128" in fp8._moe_experts_fp8_supports(x, w13, s13, w2, s2, x, x)
    assert "float16" in fp8._moe_experts_fp8_supports(x.half(), w13, s13, w2, s2, x, x)
    with pytest.raises(ValueError, match=r"fp8_experts_kernel_layout: H=200; must be a multiple of 128"):
        moe_fp8.fp8_experts_kernel_layout(w13, s13, torch.zeros(1, 200, 2, dtype=fp8.FP8_DTYPE), torch.zeros(1, 2, 2))
    layout = moe_fp8.fp8_experts_kernel_layout(*_experts(2, 128, 64))
    hidden, residual, gamma, gate_t = _block_inputs(1, 2, 128, torch.float32)
    with pytest.raises(ValueError, match=r"moe_block_decode_fp8: E=2; must be 8..512"):
        run(moe_fp8.moe_block_decode_fp8, hidden, residual, gamma, gate_t, *layout, 1e-6, 1, True)
    with pytest.raises(ValueError, match=r"moe_decode_fp8: T=129; must be 1..128"):
        run(
            moe_fp8.moe_decode_fp8,
            torch.zeros(129, 128),
            *layout,
            torch.ones(129, 1),
            torch.zeros(129, 1, dtype=torch.int32),
        )
