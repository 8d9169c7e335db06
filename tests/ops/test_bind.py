"""`vllm_nki_moe.ops`: the torch backend against Hugging Face's Qwen3-MoE modules, and backend binding rules."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

from vllm_nki_moe import ops
from vllm_nki_moe.envs import KERNELS_ENV
from vllm_nki_moe.ops import moe, norms, rope, router

TOKENS = [1, 7, 83]  # one token, an odd count, more than a few tiles' worth for a tiny hidden size


def hf_config(**overrides) -> Qwen3MoeConfig:
    fields = dict(
        hidden_size=48,
        moe_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=3,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
    )
    return Qwen3MoeConfig(**{**fields, **overrides})


@pytest.mark.parametrize("tokens", TOKENS)
def test_rms_norm_matches_hf(tokens):
    torch.manual_seed(0)
    norm = hf.Qwen3MoeRMSNorm(48, eps=1e-6)
    norm.weight.data = torch.randn(48)
    x = torch.randn(tokens, 48) * 3
    torch.testing.assert_close(norms.rms_norm(x, norm.weight, 1e-6), norm(x), rtol=0, atol=0)
    # per-head (q/k norm): [T, heads, head_dim]
    xh = torch.randn(tokens, 4, 48)
    torch.testing.assert_close(norms.rms_norm(xh, norm.weight, 1e-6), norm(xh), rtol=0, atol=0)


def test_fused_add_rms_norm_returns_the_sum_as_new_residual():
    torch.manual_seed(1)
    x, residual, weight = torch.randn(5, 32), torch.randn(5, 32), torch.randn(32)
    normed, new_residual = norms.fused_add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(new_residual, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(normed, norms.rms_norm(x + residual, weight, 1e-5), rtol=0, atol=0)


@pytest.mark.parametrize("theta", [10_000.0, 1_000_000.0])
def test_rope_matches_hf_bit_for_bit(theta):
    torch.manual_seed(2)
    cfg = hf_config(rope_parameters={"rope_type": "default", "rope_theta": theta}, max_position_embeddings=256)
    positions = torch.tensor([0, 1, 5, 200, 17, 3])
    q, k = torch.randn(6, 4 * 16), torch.randn(6, 2 * 16)
    rotary = hf.Qwen3MoeRotaryEmbedding(cfg)
    cos, sin = rotary(q, positions[None])
    q_ref, k_ref = hf.apply_rotary_pos_emb(
        q.view(1, 6, 4, 16).transpose(1, 2), k.view(1, 6, 2, 16).transpose(1, 2), cos, sin
    )
    cache = rope.rope_cos_sin_cache(16, 256, theta)
    q_out, k_out = rope.apply_rope(q, k, positions, cache, 16)
    torch.testing.assert_close(q_out.view(6, 4, 16), q_ref[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(k_out.view(6, 2, 16), k_ref[0].transpose(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("tokens", TOKENS)
def test_router_and_experts_match_hf_sparse_moe_block(tokens, renormalize):
    torch.manual_seed(3)
    cfg = hf_config(norm_topk_prob=renormalize)
    block = hf.Qwen3MoeSparseMoeBlock(cfg)
    for p in block.parameters():
        p.data = torch.randn_like(p) * 0.2
    x = torch.randn(1, tokens, 48)
    logits = x[0] @ block.gate.weight.T
    weights, ids = router.router_topk(logits, 3, renormalize)
    _, hf_weights, hf_ids = block.gate(x[0])
    torch.testing.assert_close(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights)
    out = moe.moe_experts(x[0], block.experts.gate_up_proj, block.experts.down_proj, weights, ids)
    torch.testing.assert_close(out, block(x)[0], rtol=1e-5, atol=1e-6)


def test_experts_handle_every_token_on_one_expert_and_idle_experts():
    torch.manual_seed(4)
    hidden, w13, w2 = torch.randn(9, 16), torch.randn(4, 2 * 8, 16), torch.randn(4, 16, 8)
    ids = torch.tensor([[2, 0]] * 9)  # experts 1 and 3 get nothing; expert 2 gets every token
    weights = torch.rand(9, 2)
    out = moe.moe_experts(hidden, w13, w2, weights, ids)
    expected = sum(weights[:, k : k + 1] * (moe.silu_mul(hidden @ w13[e].T) @ w2[e].T) for k, e in enumerate((2, 0)))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_bind_torch_uses_torch_for_every_op():
    opset = ops.bind("torch")
    assert opset.backend == "torch" and opset.kernel_ops == ()
    assert opset.implementations["moe_experts"] is moe.moe_experts


def test_unknown_backend_names_the_choices(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match="VLLM_NKI_MOE_KERNELS='cuda'; must be one of auto, torch, emulator, nki"):
        ops.bind()


def test_nki_backend_without_the_real_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr("vllm_nki_moe.ops.kernel_call.real_nki_available", lambda: False)
    with pytest.raises(RuntimeError, match="real `nki` package is not importable"):
        ops.bind("nki")


def test_auto_is_torch_without_the_real_nki(monkeypatch):
    monkeypatch.setattr("vllm_nki_moe.ops.kernel_call.real_nki_available", lambda: False)
    assert ops.bind("auto").backend == "torch"


def _moe_block_inputs(tokens: int, hidden: int = 128, experts: int = 8, inter: int = 32, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(tokens, hidden, generator=g),
        torch.randn(tokens, hidden, generator=g),
        1 + 0.1 * torch.randn(hidden, generator=g),
        1e-6,
        0.2 * torch.randn(experts, hidden, generator=g),
        0.2 * torch.randn(experts, 2 * inter, hidden, generator=g),
        0.2 * torch.randn(experts, hidden, inter, generator=g),
        2,
        True,
    )


@pytest.mark.parametrize("lnc", ["1", "2"])
@pytest.mark.parametrize("tokens", [1, 37])
def test_moe_block_uses_the_fused_kernel_for_decode_and_the_sequence_otherwise(tokens, lnc, monkeypatch):
    from vllm_nki_moe.ops import moe as moe_wrapper

    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", lnc)
    called = []
    real = moe_wrapper.call_kernel

    def spy(backend, kernel, *args, grid=1):
        called.append((kernel.__name__, grid))
        return real(backend, kernel, *args, grid=grid)

    monkeypatch.setattr(moe_wrapper, "call_kernel", spy)
    emulated = ops.bind("emulator")
    assert "moe_block" in emulated.kernel_ops
    args = _moe_block_inputs(tokens)
    out, residual = emulated.moe_block(*args)
    ref_out, ref_residual = ops.bind("torch").moe_block(*args)
    torch.testing.assert_close(residual, ref_residual, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)  # fp32 kernels, another summation order
    # the kernels split their work over the logical core's physical cores
    assert called == [("moe_block_decode" if tokens == 1 else "moe_prefill", int(lnc))]


def test_torch_moe_block_is_the_ops_in_sequence():
    hidden, residual, norm_w, eps, gate_w, w13, w2, top_k, renorm = _moe_block_inputs(6)
    out, new_residual = ops.bind("torch").moe_block(hidden, residual, norm_w, eps, gate_w, w13, w2, top_k, renorm)
    normed, expected_residual = norms.fused_add_rms_norm(hidden, residual, norm_w, eps)
    weights, ids = router.router_topk(normed @ gate_w.T, top_k, renorm)
    torch.testing.assert_close(new_residual, expected_residual, rtol=0, atol=0)
    torch.testing.assert_close(out, moe.moe_experts(normed, w13, w2, weights, ids), rtol=1e-6, atol=1e-6)


def test_router_gate_topk_runs_the_matmul_kernel_where_it_applies(monkeypatch):
    from vllm_nki_moe.ops import router as router_wrapper

    called = []
    real = router_wrapper.call_kernel
    monkeypatch.setattr(router_wrapper, "call_kernel", lambda b, k, *a: called.append(k.__name__) or real(b, k, *a))
    emulated, reference = ops.bind("emulator"), ops.bind("torch")
    g = torch.Generator().manual_seed(6)
    for hidden_size, kernel in ((256, "router_topk_matmul"), (96, "router_topk")):  # 96: H not a multiple of 128
        called.clear()
        hidden, gate = torch.randn(5, hidden_size, generator=g), torch.randn(16, hidden_size, generator=g)
        weights, ids = emulated.router_gate_topk(hidden, gate, 4, True)
        ref_weights, ref_ids = reference.router_gate_topk(hidden, gate, 4, True)
        torch.testing.assert_close(ids, ref_ids)
        torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
        assert called == [kernel]
