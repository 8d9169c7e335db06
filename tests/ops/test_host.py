"""`vllm_nki_moe.ops` host fast path (`*_host`, vLLM's CPU custom ops) against each op's reference,
its fallbacks, and when `ops.bind` chooses it."""

from __future__ import annotations

import logging

import pytest
import torch

from vllm_nki_moe import envs, ops
from vllm_nki_moe.envs import KERNELS_ENV
from vllm_nki_moe.ops import attention, host, moe, norms, rope, router
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close

TOKENS = [1, 7, 129]  # one token (decode), an odd count, PMAX + 1 (a ragged tail past a 128-row tile)
DTYPES = [torch.float32, torch.bfloat16]
# Tolerances (tools/kernel_check/tolerances.py): the C++ ops compute the same functions in fp32 with another summation
# order and FMA contraction; bf16 rounds once where the reference (as HF) rounds the normed value before the weight.
ELEMENTWISE = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
# The fused MoE sums over H and over the top-k experts in another order, and keeps bf16 intermediates in fp32.
MATMUL = {torch.float32: "float32_matmul", torch.bfloat16: "bfloat16_matmul"}

# (hidden, heads q, heads kv, head_dim): odd tiny, the tiny test model, Qwen3-30B-A3B per rank at TP 4 and TP 8.
ATTENTION_SHAPES = [(96, 6, 1, 32), (128, 4, 2, 64), (2048, 8, 1, 128), (2048, 4, 1, 128)]
# (hidden, intermediate per rank, experts, top-k). Qwen3-30B-A3B per rank (H 2048, I 192 at TP 4, 96 at TP 8, top-8)
# with 16 of its 128 experts, so that the fp32 reference stays well under a second; 48 and 96 need padding to 32.
MOE_SHAPES = [(96, 48, 16, 4), (128, 64, 8, 2), (2048, 192, 16, 8), (2048, 96, 16, 8)]


@pytest.fixture(scope="module", autouse=True)
def vllm_cpu_ops():
    """vLLM's CPU custom ops, loaded as vLLM's CPU platform loads them (its ISA choice), or the module is skipped."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip(f"vLLM platform {type(current_platform).__name__} is not CPU")
    current_platform.import_kernels()
    reason = host.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def _randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Each fast op vs its reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", [48, 769, 2048])
def test_rms_norm_matches_reference(tokens, hidden, dtype):
    x, w = _randn(tokens, hidden, dtype=dtype, scale=3), _randn(hidden, dtype=dtype, seed=1)
    assert_close(norms.rms_norm_host(x, w, 1e-6), norms.rms_norm(x, w, 1e-6), ELEMENTWISE[dtype])


@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm_of_a_strided_per_head_view_matches_reference(tokens):
    # q as the model slices it from the fused qkv output: rows of head_dim with a token stride of the qkv width.
    qkv = _randn(tokens, 8 * 64 + 2 * 64)
    q = qkv[:, : 8 * 64].view(tokens, 8, 64)
    w = _randn(64, seed=1)
    assert_close(norms.rms_norm_host(q, w, 1e-5), norms.rms_norm(q, w, 1e-5), "float32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_fused_add_rms_norm_matches_reference_and_leaves_its_inputs_alone(tokens, dtype):
    x, residual, w = _randn(tokens, 96, dtype=dtype), _randn(tokens, 96, dtype=dtype, seed=1), _randn(96, seed=2)
    w = w.to(dtype)
    x0, residual0 = x.clone(), residual.clone()
    normed, new_residual = norms.fused_add_rms_norm_host(x, residual, w, 1e-6)
    ref_normed, ref_residual = norms.fused_add_rms_norm(x, residual, w, 1e-6)
    assert_close(new_residual, ref_residual, "exact")  # the same single add
    assert_close(normed, ref_normed, ELEMENTWISE[dtype])
    assert torch.equal(x, x0) and torch.equal(residual, residual0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden,q_heads,kv_heads,head_dim", ATTENTION_SHAPES)
def test_qk_norm_rope_on_qkv_views_matches_reference_and_leaves_qkv_alone(
    tokens, hidden, q_heads, kv_heads, head_dim, dtype
):
    q_size, kv_size = q_heads * head_dim, kv_heads * head_dim
    qkv = _randn(tokens, q_size + 2 * kv_size, dtype=dtype)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    # Norm weights near 1, as trained q/k norms: outputs of order 1, where the bf16 table entries are calibrated.
    qw, kw = (1 + 0.1 * _randn(head_dim, seed=s) for s in (1, 2))
    qw, kw = qw.to(dtype), kw.to(dtype)
    cache = rope.rope_cos_sin_cache(head_dim, 4096, 1e6)
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(3))
    positions[0] = 4095  # the cache's last row
    qkv0 = qkv.clone()
    got = rope.qk_norm_rope_host(q, k, qw, kw, 1e-6, positions, cache, head_dim)
    want = rope.qk_norm_rope(q, k, qw, kw, 1e-6, positions, cache, head_dim)
    # In bf16 the reference rounds the normed value, its product with the weight and each RoPE product (a chain of
    # bf16 intermediates, with cancellation in x1*cos - x2*sin); the C++ ops round the norm and the rotation once each.
    assert_close(got, want, {torch.float32: "float32", torch.bfloat16: "bfloat16_matmul"}[dtype])
    assert torch.equal(qkv, qkv0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_apply_rope_matches_reference(tokens, dtype):
    q, k = _randn(tokens, 6 * 32, dtype=dtype), _randn(tokens, 32, dtype=dtype, seed=1)
    cache = rope.rope_cos_sin_cache(32, 300, 10_000.0)
    positions = torch.arange(tokens) % 300
    q0, k0 = q.clone(), k.clone()
    got = rope.apply_rope_host(q, k, positions, cache, 32)
    assert_close(got, rope.apply_rope(q, k, positions, cache, 32), ELEMENTWISE[dtype])
    assert torch.equal(q, q0) and torch.equal(k, k0)


def test_rope_past_the_cache_raises():
    q, k = _randn(2, 64), _randn(2, 64)
    cache = rope.rope_cos_sin_cache(64, 16, 1e6)
    with pytest.raises(IndexError, match=r"rope.apply_rope_host: position=16; must be < 16"):
        rope.apply_rope_host(q, k, torch.tensor([3, 16]), cache, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("inter", [37, 192, 1024])
def test_silu_mul_matches_reference(tokens, inter, dtype):
    gate_up = _randn(tokens, 2 * inter, dtype=dtype, scale=2)
    assert_close(moe.silu_mul_host(gate_up), moe.silu_mul(gate_up), ELEMENTWISE[dtype])


def _moe_inputs(tokens, hidden, inter, experts, top_k, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(tokens, hidden, generator=g).to(dtype)
    # Weight scale ~ 1/sqrt(fan-in), as trained layers: outputs of order 1 at every size.
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
    weights, ids = router.router_topk(torch.randn(tokens, experts, generator=g), top_k, True)
    return hidden_states, w13, w2, weights, ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden,inter,experts,top_k", MOE_SHAPES)
def test_moe_experts_matches_reference(tokens, hidden, inter, experts, top_k, dtype):
    args = _moe_inputs(tokens, hidden, inter, experts, top_k, dtype)
    assert_close(moe.moe_experts_host(*args), moe.moe_experts(*args), MATMUL[dtype])


def test_moe_experts_with_one_hot_expert_and_unused_experts_matches_reference():
    hidden, w13, w2, weights, _ = _moe_inputs(33, 96, 48, 16, 2)
    ids = torch.tensor([[5, 9]] * 33)  # every token to the same two experts; 14 experts idle
    assert_close(
        moe.moe_experts_host(hidden, w13, w2, weights, ids),
        moe.moe_experts(hidden, w13, w2, weights, ids),
        "float32_matmul",
    )


def test_moe_experts_repacks_after_weights_change_in_place():
    hidden, w13, w2, weights, ids = _moe_inputs(7, 96, 48, 16, 4)
    w13, w2 = torch.nn.Parameter(w13), torch.nn.Parameter(w2)
    first = moe.moe_experts_host(hidden, w13, w2, weights, ids)
    assert moe._packed_experts.get(moe.pack_experts, w13, w2) is moe._packed_experts.get(
        moe.pack_experts, w13, w2
    )  # packed once, then reused
    # A reload as the model does it (Qwen3MoeExperts.load_expert_weight): copy through .data, bump the version.
    w13.data.mul_(2.0)
    torch.autograd.graph.increment_version(w13)
    second = moe.moe_experts_host(hidden, w13, w2, weights, ids)
    assert not torch.allclose(first, second)
    with torch.no_grad():
        assert_close(second, moe.moe_experts(hidden, w13, w2, weights, ids), "float32_matmul")


def test_padding_the_intermediate_size_is_exact():
    _, w13, w2, _, _ = _moe_inputs(1, 64, 40, 4, 2)
    padded13, padded2 = moe._pad_intermediate(w13, w2, 64)
    assert padded13.shape == (4, 128, 64) and padded2.shape == (4, 64, 64)
    assert torch.equal(padded13[:, :40], w13[:, :40]) and torch.equal(padded13[:, 64:104], w13[:, 40:])
    assert not padded13[:, 40:64].any() and not padded13[:, 104:].any() and not padded2[:, :, 40:].any()


# ---------------------------------------------------------------------------------------------------------------------
# Fallbacks: what the C++ ops cannot take runs the reference, and says why once


def test_moe_experts_with_hidden_not_a_multiple_of_32_runs_the_reference_and_logs_why(caplog):
    args = _moe_inputs(5, 48, 24, 8, 3)
    host._logged.clear()
    with caplog.at_level(logging.INFO, logger="vllm_nki_moe.ops.host"):
        out = moe.moe_experts_host(*args)
        moe.moe_experts_host(*args)
    assert_close(out, moe.moe_experts(*args), "exact")
    reasons = [r.getMessage() for r in caplog.records if "hidden=48" in r.getMessage()]
    assert reasons == [
        "vllm_nki_moe.ops.host: moe_experts: hidden=48; cpu_fused_moe needs a multiple of 32; runs ops.moe.moe_experts"
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_with_head_dim_not_a_multiple_of_32_runs_the_reference(dtype):
    # head_dim 24 crashed vLLM's bf16 rotary_embedding on this build (its scalar tail): it must never reach it.
    q, k = _randn(5, 3 * 24, dtype=dtype), _randn(5, 24, dtype=dtype, seed=1)
    cache, positions = rope.rope_cos_sin_cache(24, 64, 1e4), torch.arange(5)
    assert_close(rope.apply_rope_host(q, k, positions, cache, 24), rope.apply_rope(q, k, positions, cache, 24), "exact")


def test_no_tokens_gives_empty_results_as_the_reference():
    # (rope.qk_norm_rope cannot take 0 tokens either: its per-head view of 0 elements is ambiguous.)
    x, w = _randn(0, 128), _randn(128)
    hidden, w13, w2, weights, ids = _moe_inputs(0, 96, 48, 16, 4)
    assert norms.rms_norm_host(x, w, 1e-6).shape == (0, 128)
    assert moe.silu_mul_host(x).shape == (0, 64)
    assert moe.moe_experts_host(hidden, w13, w2, weights, ids).shape == (0, 96)


def test_rms_norm_with_a_weight_of_another_dtype_runs_the_reference():
    x, w = _randn(3, 64, dtype=torch.bfloat16), _randn(64)
    assert_close(norms.rms_norm_host(x, w, 1e-6), norms.rms_norm(x, w, 1e-6), "exact")


def test_a_missing_custom_op_binds_the_reference_and_names_it(monkeypatch, caplog):
    real = host._c_op
    monkeypatch.setattr(host, "_c_op", lambda name: None if name == "cpu_fused_moe" else real(name))
    monkeypatch.setenv(KERNELS_ENV, "torch")
    host._logged.clear()
    assert "torch.ops._C lacks cpu_fused_moe" in host.unavailable_reason()
    with caplog.at_level(logging.INFO, logger="vllm_nki_moe.ops.host"):
        opset = ops.bind()
    assert (
        opset.implementations["moe_experts"] is moe.moe_experts and opset.implementations["rms_norm"] is norms.rms_norm
    )
    assert any(
        "plain torch ops (the references)" in r.getMessage() and "cpu_fused_moe" in r.getMessage()
        for r in caplog.records
    )


def test_host_ops_off_binds_the_reference(monkeypatch):
    monkeypatch.setenv(envs.HOST_OPS_ENV, "off")
    monkeypatch.setenv(KERNELS_ENV, "torch")
    assert ops.bind().implementations["qk_norm_rope"] is rope.qk_norm_rope


def test_unknown_host_ops_setting_names_the_choices(monkeypatch):
    monkeypatch.setenv(envs.HOST_OPS_ENV, "fast")
    with pytest.raises(ValueError, match="VLLM_NKI_MOE_HOST_OPS='fast'; must be one of auto, off"):
        host.unavailable_reason()


# ---------------------------------------------------------------------------------------------------------------------
# Which binding gets the fast path


@pytest.mark.parametrize("env", ["torch", "auto"])
def test_the_backend_from_the_environment_binds_the_fast_ops(env, monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, env)
    monkeypatch.setattr("vllm_nki_moe.ops.kernel_call.real_nki_available", lambda: False)
    opset = ops.bind()
    assert opset.backend == "torch"
    assert {name: opset.implementations[name] for name in ops.HOST_FAST_OPS} == ops.HOST_FAST_OPS
    assert (
        opset.implementations["router_topk"] is router.router_topk
        and opset.implementations["attention_decode"] is attention.attention_decode
    )


def test_torch_named_in_code_is_the_plain_reference_unless_asked():
    assert ops.bind("torch").implementations["moe_experts"] is moe.moe_experts
    assert ops.bind("torch", host_ops=True).implementations["moe_experts"] is moe.moe_experts_host


def test_emulator_backend_keeps_the_reference_for_ops_without_kernels():
    opset = ops.bind("emulator")
    assert all(opset.implementations[name] is not fast for name, fast in ops.HOST_FAST_OPS.items())


@pytest.mark.parametrize("tokens", [1, 37])
def test_fast_moe_block_matches_the_reference_sequence(tokens):
    g = torch.Generator().manual_seed(5)
    hidden, residual = torch.randn(tokens, 128, generator=g), torch.randn(tokens, 128, generator=g)
    norm_w, gate_w = 1 + 0.1 * torch.randn(128, generator=g), 0.2 * torch.randn(8, 128, generator=g)
    w13, w2 = 0.1 * torch.randn(8, 64, 128, generator=g), 0.1 * torch.randn(8, 128, 32, generator=g)
    args = (hidden, residual, norm_w, 1e-6, gate_w, w13, w2, 2, True)
    out, new_residual = ops.bind("torch", host_ops=True).moe_block(*args)
    ref_out, ref_residual = ops.bind("torch").moe_block(*args)
    assert_close(new_residual, ref_residual, "exact")
    # Same experts chosen here (no near-tie in these router logits), so only the rounding of the sums differs.
    assert_close(out, ref_out, "float32_matmul")


@pytest.mark.parametrize("tokens", [1, 7])
def test_prepared_experts_are_the_one_packed_copy_and_match_the_reference(tokens):
    """The model converts its experts once (OpSet.prepare_weights): the parameters then hold the packed layout, the
    op reads them as they are (no cached second copy) and matches the reference on the original weights."""
    opset = ops.bind("torch", host_ops=True)
    hidden, w13, w2, weights, ids = _moe_inputs(tokens, 96, 48, 16, 4)
    original = (w13.clone(), w2.clone())
    w13, w2 = torch.nn.Parameter(w13, requires_grad=False), torch.nn.Parameter(w2, requires_grad=False)
    opset.prepare_weights("moe_experts", w13, w2)
    assert moe.layout_of(w13) == moe.layout_of(w2) == moe.PACKED_LAYOUT
    assert moe.expert_dims(w13, w2) == (16, 48, 96)  # the logical sizes survive the padding to 64
    moe._packed_experts.clear()
    got = opset.moe_experts(hidden, w13, w2, weights, ids)
    assert not moe._packed_experts._cache
    assert_close(got, moe.moe_experts(hidden, *original, weights, ids), "float32_matmul")
    with pytest.raises(ValueError, match="already hold the packed layout"):
        opset.prepare_weights("moe_experts", w13, w2)
