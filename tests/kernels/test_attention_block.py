"""kernels/attention_block.py: the fused FP8 decode attention half against its reference (the model's ops in
sequence from the same kernel-layout weights), the op against the ops one by one, LNC 2, and bad input."""

from __future__ import annotations

import pytest
import torch
from vllm_nki_moe.kernels import attention_block as kernel
from vllm_nki_moe.kernels import linear_fp8

from nki_emulator import run
from vllm_nki_moe import ops
from vllm_nki_moe.ops import attention_block as block_ops
from vllm_nki_moe.ops import fp8
from vllm_nki_moe.ops.rope import rope_cos_sin_cache
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close

from .test_attention_decode import _inputs

D = kernel.HEAD_DIM
TOLERANCE = {torch.float32: "float32_matmul", torch.bfloat16: "bfloat16_matmul"}


def _projection(n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A block-scaled FP8 weight [n, k] as the model holds it (e4m3fn + scale_inv)."""
    return fp8.quantize(torch.randn(n, k, generator=g) * k**-0.5)


def _args(rng, lens, hq, hk, H, dtype, model_layout=False, seed=0, fp8_weights=True):
    """The fused kernel's arguments for one decode step of len(lens) sequences (contexts ``lens`` incl. the new
    token), over a shuffled paged cache with stale values outside every context (``test_attention_decode``)."""
    g = torch.Generator().manual_seed(seed)
    _, _, _, k_cache, v_cache, slots, tables, ctx, scale = _inputs(rng, lens, hq, hk, D, dtype)
    T = len(lens)
    hidden, residual = (torch.randn(T, H, generator=g).to(dtype) for _ in range(2))
    gamma, q_norm, k_norm = ((1 + 0.2 * torch.randn(n, generator=g)).to(dtype) for n in (H, D, D))
    if not fp8_weights:  # weights in the activation dtype: [N, K] as the model holds them, or W^T for the kernel
        qkv, o = (
            (torch.randn(n, k, generator=g) * k**-0.5).to(dtype) for n, k in (((hq + 2 * hk) * D, H), (H, hq * D))
        )
        qkv, o = ((qkv,), (o,)) if model_layout else ((qkv.t().contiguous(),), (o.t().contiguous(),))
    else:
        qkv, o = _projection((hq + 2 * hk) * D, H, g), _projection(H, hq * D, g)
    if fp8_weights and not model_layout:
        qkv, o = linear_fp8.linear_fp8_kernel_layout(*qkv), linear_fp8.linear_fp8_kernel_layout(*o)
    positions = (ctx - 1).to(torch.int32)
    cos_sin = rope_cos_sin_cache(D, 8192, 1e6, None)
    return [hidden, residual, gamma, *qkv, q_norm, k_norm, positions, cos_sin, *o, k_cache, v_cache, slots, tables, ctx]


def _check(args, dtype, eps=1e-6, programs=1, fp8_weights=True):
    fn = kernel.attention_block_decode_fp8 if fp8_weights else kernel.attention_block_decode
    fn = fn if programs == 1 else fn[programs]
    scale = D**-0.5
    (out, r, k_cache, v_cache), _ = run(fn, *args, eps, scale)
    want = (kernel.attention_block_fp8_ref if fp8_weights else kernel.attention_block_ref)(*args, eps, scale)
    assert out.dtype == dtype and out.shape == args[0].shape
    assert_close(out, want[0], TOLERANCE[dtype])
    assert torch.equal(r, want[1])  # x + residual rounded once: exact
    # the new K/V (after q/k/v, norm and RoPE) at their slots, everything else untouched
    assert_close(k_cache, want[2], TOLERANCE[dtype])
    assert_close(v_cache, want[3], TOLERANCE[dtype])
    untouched = torch.ones(k_cache.shape[0] * k_cache.shape[2], dtype=torch.bool)
    slots = args[-3].long()
    untouched[slots[slots >= 0]] = False
    stale = args[-5].permute(0, 2, 1, 3).reshape(-1, *args[-5].shape[1:2], D)[untouched]
    assert torch.equal(k_cache.permute(0, 2, 1, 3).reshape(-1, k_cache.shape[1], D)[untouched], stale)
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_the_op_sequence_at_qwen3_30b_a3b_tp4(dtype, rng):
    """8 query heads, 1 kv head of 128, hidden 2048; the contest's 640-token context."""
    _check(_args(rng, [640], 8, 1, 2048, dtype), dtype)


@pytest.mark.parametrize("programs", [1, 2])
def test_batch_of_ragged_contexts_with_two_kv_heads(programs, rng):
    """4 sequences (contexts 1, 33, 200, 97), GQA 3 query heads per kv head: on two programs the 6 query heads split
    3 / 3, one kv head each."""
    _check(_args(rng, [1, 33, 200, 97], 6, 2, 256, torch.bfloat16), torch.bfloat16, programs=programs)


def test_two_programs_sharing_one_kv_head_match_one_program(rng):
    """LNC 2 at Qwen3-30B-A3B TP 4: both programs compute the one kv head and write the same bytes; the o partial
    sums meet by sendrecv (a different fp32 order than one program: close, not equal)."""
    args = _args(rng, [640, 5], 8, 1, 2048, torch.bfloat16)
    one = _check([a.clone() if isinstance(a, torch.Tensor) else a for a in args], torch.bfloat16)
    two = _check(args, torch.bfloat16, programs=2)
    assert_close(two, one, "bfloat16")


@pytest.mark.parametrize("dtype, programs", [(torch.bfloat16, 2), (torch.float32, 1)])
def test_unquantized_weights_match_the_op_sequence(dtype, programs, rng):
    """attention_block_decode (weights in the activation dtype, transposed) at Qwen3-30B-A3B TP 4 and a batch of
    two: q/k/v and o accumulate in PSUM, the rest as the FP8 kernel."""
    _check(_args(rng, [640, 77], 8, 1, 2048, dtype, fp8_weights=False), dtype, programs=programs, fp8_weights=False)


def test_unquantized_op_runs_the_kernel_and_equals_the_ops_one_by_one(rng):
    """ops.attention_block under the emulator on the model's [N, K] weights against the torch backend's sequence."""
    kernel_args = _args(rng, [300, 17], 4, 2, 256, torch.float32, model_layout=True, fp8_weights=False)
    args = kernel_args[:3] + [1e-6] + kernel_args[3:] + [D**-0.5]
    torch_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    emulated = ops.bind("emulator")
    assert "attention_block" in emulated.kernel_ops
    out, r = emulated.attention_block(*args)
    want, want_r = ops.bind("torch").attention_block(*torch_args)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r, want_r, rtol=0, atol=0)
    torch.testing.assert_close(args[-6], torch_args[-6], rtol=1e-4, atol=1e-5)  # k_cache, written in place


def test_uses_each_norm_weight_and_the_position(rng):
    """Swapping the q and k norm weights, or moving the token by one position, changes the output."""
    args = _args(rng, [50], 4, 1, 256, torch.float32)
    base = kernel.attention_block_fp8_ref(*args, 1e-6, D**-0.5)[0]
    swapped = list(args)
    swapped[5], swapped[6] = args[6], args[5]
    moved = list(args)
    moved[7] = args[7] + 1
    for changed in (swapped, moved):
        (out, *_), _ = run(kernel.attention_block_decode_fp8, *changed, 1e-6, D**-0.5)
        assert (out - base).abs().max() > 1e-3


def test_the_op_runs_the_kernel_and_equals_the_ops_one_by_one(rng):
    """ops.attention_block_fp8 under the emulator (model-layout weights, converted once) against the torch
    backend's sequence; both write the caller's caches in place."""
    kernel_args = _args(rng, [300, 17], 4, 2, 256, torch.float32, model_layout=True)
    args = kernel_args[:3] + [1e-6] + kernel_args[3:] + [D**-0.5]  # the op's order: eps after the norm weight
    torch_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    emulated, reference = ops.bind("emulator"), ops.bind("torch")
    assert "attention_block_fp8" in emulated.kernel_ops
    out, r = emulated.attention_block_fp8(*args)
    want, want_r = reference.attention_block_fp8(*torch_args)
    # torch's linear_fp8 rounds the dequantized weight to x's dtype (fp32 here: exact), the kernel its columns
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r, want_r, rtol=0, atol=0)
    torch.testing.assert_close(args[-6], torch_args[-6], rtol=1e-4, atol=1e-5)  # k_cache, written in place
    torch.testing.assert_close(args[-5], torch_args[-5], rtol=1e-4, atol=1e-5)


def test_the_op_runs_as_separate_ops_where_the_kernel_does_not_apply(rng):
    """head_dim 64 (the default tiny models'): not one FP8 block per head, so the sequence runs, not an error."""
    g = torch.Generator().manual_seed(0)
    d, T, H = 64, 2, 128
    _, _, _, k_cache, v_cache, slots, tables, ctx, scale = _inputs(rng, [9, 3], 2, 1, d, torch.float32)
    qkv, o = _projection(4 * d, H, g), _projection(H, 2 * d, g)
    args = [torch.randn(T, H, generator=g), torch.randn(T, H, generator=g), torch.ones(H), 1e-6, *qkv]
    args += [torch.ones(d), torch.ones(d), (ctx - 1).long(), rope_cos_sin_cache(d, 64, 1e4, None), *o]
    args += [k_cache, v_cache, slots, tables, ctx, scale]
    reason = block_ops._fp8_supports(*args)
    assert reason is not None and "head_dim 128" in reason
    out, _ = ops.bind("emulator").attention_block_fp8(*args)
    torch_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    want, _ = ops.bind("torch").attention_block_fp8(*torch_args)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_the_op_runs_as_separate_ops_beyond_the_fused_kernels_batch(rng):
    """More sequences than ``FUSED_MAX_TOKENS``: the ops one by one (faster there by the cost model), same result."""
    lens = [20 + 3 * i for i in range(kernel.FUSED_MAX_TOKENS + 1)]
    kernel_args = _args(rng, lens, 2, 1, 128, torch.float32, model_layout=True)
    args = kernel_args[:3] + [1e-6] + kernel_args[3:] + [D**-0.5]
    reason = block_ops._fp8_supports(*args)
    assert reason is not None and f"T={len(lens)}" in reason and f"1..{kernel.FUSED_MAX_TOKENS} tokens" in reason
    torch_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    out, _ = ops.bind("emulator").attention_block_fp8(*args)
    want, _ = ops.bind("torch").attention_block_fp8(*torch_args)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"H": 200}, "H=200; must be a multiple of 128"),
        ({"lens": [5] * 33, "hq": 16}, "T=33; at most 32 tokens"),
        ({"hq": 3, "hk": 2}, "must be (Hq + 2 * 2) * 128 with Hq a multiple of 2"),
        ({"positions": torch.float32}, "positions (1,) float32; must be (1,) int32"),
    ],
)
def test_rejects_invalid_inputs_naming_them(change, message, rng):
    lens, hq, hk, H = change.get("lens", [7]), change.get("hq", 2), change.get("hk", 1), change.get("H", 256)
    if H % 128:
        args = _args(rng, lens, hq, hk, 256, torch.float32)
        args[0], args[1], args[2] = (torch.zeros(len(lens), H), torch.zeros(len(lens), H), torch.ones(H))
    else:
        args = _args(rng, lens, hq, hk, H, torch.float32)
    if hq % hk:  # rows for hq = 3 with 2 kv heads: not (Hq + 4) * 128 for any Hq multiple of 2
        args[3] = torch.zeros((hq + 2 * hk) * D, H, dtype=torch.uint8)
    if "positions" in change:
        args[7] = args[7].to(change["positions"])
    with pytest.raises(ValueError) as err:
        run(kernel.attention_block_decode_fp8, *args, 1e-6, D**-0.5)
    assert message in str(err.value)


def test_unquantized_kernel_rejects_weights_of_another_dtype(rng):
    args = _args(rng, [7], 2, 1, 256, torch.float32, fp8_weights=False)
    args[3] = args[3].to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"qkv_weight_t \(256, 512\) bfloat16; must be float32 \[256"):
        run(kernel.attention_block_decode, *args, 1e-6, D**-0.5)


def test_heads_whose_weights_exceed_the_sbuf_budget_are_refused_and_the_op_runs_them_one_by_one(rng):
    """Qwen3-30B-A3B at TP 1 in bf16 (32 query and 4 kv heads of 128, hidden 2048): 288 KiB of resident weights per
    partition on one program; the kernel names the limit, the op's check sends the step to the ops one by one."""
    args = _args(rng, [9], 32, 4, 2048, torch.bfloat16, fp8_weights=False)
    with pytest.raises(ValueError, match=r"32 query and 4 kv heads at H=2048: their weights need 294912 B"):
        run(kernel.attention_block_decode, *args, 1e-6, D**-0.5)
    op_args = _args(rng, [9], 32, 4, 2048, torch.bfloat16, model_layout=True, fp8_weights=False)
    op_args = op_args[:3] + [1e-6] + op_args[3:] + [D**-0.5]
    reason = block_ops._plain_supports(*op_args)
    assert reason is not None and "the weights need 294912 B of SBUF per partition" in reason
