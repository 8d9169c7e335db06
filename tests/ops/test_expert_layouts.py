"""The experts' one copy: ``OpSet.prepare_weights`` converts the model's w13/w2 in place to the layout the bound
kernels read, and every implementation reads that copy (or says why it cannot)."""

from __future__ import annotations

import pytest
import torch

from vllm_nki_moe import ops
from vllm_nki_moe.ops import moe
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close

# Odd tiny: hidden 256 (two partition tiles), intermediate 96, 8 experts top-2; 1 token (decode kernel, fused block)
# and 9 tokens (prefill kernel, blocks; the block op as separate ops).
H, I, E, K = 256, 96, 8, 2  # noqa: E741


def _experts(seed: int):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.nn.Parameter(0.05 * torch.randn(E, 2 * I, H, generator=g), requires_grad=False)
    w2 = torch.nn.Parameter(0.05 * torch.randn(E, H, I, generator=g), requires_grad=False)
    return w13, w2, g


@pytest.mark.parametrize("tokens", [1, 9])
def test_kernel_binding_converts_once_in_place_and_reads_that_copy(tokens):
    opset = ops.bind("emulator")
    w13, w2, g = _experts(tokens)
    original = (w13.detach().clone(), w2.detach().clone())
    numel = w13.numel() + w2.numel()
    opset.prepare_weights("moe_experts", w13, w2)
    assert moe.layout_of(w13) == moe.KERNEL_LAYOUT and w13.dim() == 5
    assert w13.numel() + w2.numel() == numel  # the same elements, rearranged: no second copy
    hidden = torch.randn(tokens, H, generator=g)
    weights, ids = ops.router.router_topk(torch.randn(tokens, E, generator=g), K, True)
    moe._kernel_weights.clear()
    got = opset.moe_experts(hidden, w13, w2, weights, ids)
    assert not moe._kernel_weights._cache  # read as held, nothing converted per call
    assert_close(got, moe.moe_experts(hidden, *original, weights, ids), "float32_matmul")
    gate, norm_w = torch.randn(E, H, generator=g), 1 + 0.1 * torch.randn(H, generator=g)
    args = (hidden, torch.randn(tokens, H, generator=g), norm_w, 1e-6, gate)
    out, residual = opset.moe_block(*args, w13, w2, K, True)
    want_out, want_residual = ops.bind("torch", host_ops=False).moe_block(*args, *original, K, True)
    assert_close(out, want_out, "float32_matmul")
    torch.testing.assert_close(residual, want_residual)


def test_weights_the_kernels_cannot_take_stay_as_they_are_and_the_explicit_backend_says_why():
    opset = ops.bind("emulator")
    w13 = torch.nn.Parameter(torch.zeros(E, 2 * I, 257), requires_grad=False)
    w2 = torch.nn.Parameter(torch.zeros(E, 257, I), requires_grad=False)
    opset.prepare_weights("moe_experts", w13, w2)
    assert moe.layout_of(w13) == moe.MODEL_LAYOUT and w13.shape == (E, 2 * I, 257)
    ids = torch.zeros(1, K, dtype=torch.int64)
    with pytest.raises(ValueError, match="moe_experts: H=257"):
        opset.moe_experts(torch.zeros(1, 257), w13, w2, ids.float(), ids)


def test_the_torch_fallback_reads_kernel_layout_experts():
    w13, w2, g = _experts(3)
    original = (w13.detach().clone(), w2.detach().clone())
    ops.bind("emulator").prepare_weights("moe_experts", w13, w2)
    hidden = torch.randn(4, H, generator=g)
    weights, ids = ops.router.router_topk(torch.randn(4, E, generator=g), K, True)
    torch.testing.assert_close(
        moe.moe_experts_any_layout(hidden, w13, w2, weights, ids), moe.moe_experts(hidden, *original, weights, ids)
    )


def test_the_reference_binding_keeps_the_model_layout():
    w13, w2, _ = _experts(4)
    before = w13.data_ptr()
    ops.bind("torch", host_ops=False).prepare_weights("moe_experts", w13, w2)
    assert moe.layout_of(w13) == moe.MODEL_LAYOUT and w13.data_ptr() == before


@pytest.mark.parametrize("tokens", [1, 9])  # 1: the fused decode block reads [HP, KT, E]; 9: the router kernel [H, E]
def test_the_router_weight_is_kept_once_and_both_kernels_read_it_as_views(tokens, monkeypatch):
    from vllm_nki_moe.ops import router

    opset = ops.bind("emulator")
    w13, w2, g = _experts(10 + tokens)
    original = (w13.detach().clone(), w2.detach().clone())
    opset.prepare_weights("moe_experts", w13, w2)
    gate = torch.nn.Parameter(torch.randn(E, H, generator=g), requires_grad=False)
    gate_model = gate.detach().clone()
    opset.prepare_weights("router_gate_topk", gate)
    assert gate.shape == (E, H) and torch.equal(gate, gate_model)  # the same values, column-major storage
    storage = gate.untyped_storage().data_ptr()
    assert gate.t().is_contiguous() and gate.untyped_storage().nbytes() == gate.numel() * gate.element_size()
    moe._kernel_weights.clear()
    router._gate_weights.clear()
    hidden, residual = torch.randn(tokens, H, generator=g), torch.randn(tokens, H, generator=g)
    norm_w = 1 + 0.1 * torch.randn(H, generator=g)
    out, _ = opset.moe_block(hidden, residual, norm_w, 1e-6, gate, w13, w2, K, True)
    assert not moe._kernel_weights._cache and not router._gate_weights._cache  # nothing converted per call
    seen = []
    real = moe.call_kernel if tokens == 1 else router.call_kernel

    def spy(backend, kernel, *args, **kwargs):
        seen.extend(a for a in args if isinstance(a, torch.Tensor) and a.dtype == gate.dtype and E in a.shape[-1:])
        return real(backend, kernel, *args, **kwargs)

    monkeypatch.setattr(moe if tokens == 1 else router, "call_kernel", spy)
    opset.moe_block(hidden, residual, norm_w, 1e-6, gate, w13, w2, K, True)
    router_args = [a for a in seen if a.numel() == E * H]
    assert router_args and all(a.untyped_storage().data_ptr() == storage for a in router_args)  # views of the copy
    want, _ = ops.bind("torch", host_ops=False).moe_block(
        hidden, residual, norm_w, 1e-6, gate_model, *original, K, True
    )
    assert_close(out, want, "float32_matmul")


def test_the_torch_binding_leaves_the_router_weight_as_the_checkpoint_stores_it():
    gate = torch.nn.Parameter(torch.randn(E, H), requires_grad=False)
    ops.bind("torch").prepare_weights("router_gate_topk", gate)
    assert gate.is_contiguous()
