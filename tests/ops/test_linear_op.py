"""``ops.linear`` and the model's vLLM linear layers routed through it under kernel backends."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from vllm_nki_moe import ops
from vllm_nki_moe.ops import linear as linear_ops
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close


def test_emulator_binding_matches_f_linear_and_reads_the_prepared_weight_as_a_view(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(5, 256, generator=g), torch.nn.Parameter(torch.randn(300, 256, generator=g) / 16)
    want, before = F.linear(x, weight), weight.detach().clone()
    opset = ops.bind("emulator")
    opset.prepare_weights("linear", weight)
    assert weight.shape == (300, 256) and weight.t().is_contiguous() and torch.equal(weight, before)
    seen = []
    real = linear_ops.call_kernel
    monkeypatch.setattr(linear_ops, "call_kernel", lambda b, k, *a, **kw: seen.append(a) or real(b, k, *a, **kw))
    linear_ops._weights.clear()
    got = opset.linear(x, weight)
    assert_close(got, want, "float32_matmul")
    assert seen and seen[0][1].data_ptr() == weight.data_ptr() and not linear_ops._weights._cache


def test_an_explicit_kernel_backend_names_what_the_kernel_cannot_take():
    opset = ops.bind("emulator")
    with pytest.raises(ValueError, match=r"^linear: K=257; the kernel needs ceil\(K/128\)=3 equal partition tiles"):
        opset.linear(torch.zeros(2, 257), torch.zeros(4, 257))


def test_the_torch_binding_leaves_weights_and_layers_to_vllm():
    weight = torch.nn.Parameter(torch.randn(8, 128))
    opset = ops.bind("torch")
    opset.prepare_weights("linear", weight)
    assert weight.is_contiguous() and "linear" not in opset.kernel_ops


@pytest.mark.parametrize("backend, routed", [("emulator", True), ("torch", False)])
def test_the_models_projections_and_lm_head_run_the_op_under_kernel_backends(tiny_model_dir, backend, routed):
    from vllm_nki_moe.models.linear_method import OpsLinearMethod
    from vllm_nki_moe.tools.generate import Harness

    harness = Harness(str(tiny_model_dir), backend)
    model = harness.model
    attn = model.model.layers[0].self_attn
    for layer in (attn.qkv_proj, attn.o_proj, model.lm_head):
        assert isinstance(layer.quant_method, OpsLinearMethod) == routed
        if routed:  # loaded once, stored as the kernel reads it; vLLM's CPU pre-packing did not drop it
            assert layer.weight.numel() > 0 and layer.weight.t().is_contiguous()
    del harness, model, attn, layer
    gc.collect()  # vLLM's CPU GEMM handles (torch case) are freed here, not inside a later test's trace


@pytest.mark.parametrize("env, grid", [(None, 1), ("1", 1), ("2", 2)])
def test_the_logical_core_size_sets_the_launch_grid(monkeypatch, env, grid):
    if env is None:
        monkeypatch.delenv("NEURON_LOGICAL_NC_CONFIG", raising=False)
    else:
        monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", env)
    seen = []
    real = linear_ops.call_kernel

    def spy(backend, kernel, *args, grid=1):
        seen.append(grid)
        return real(backend, kernel, *args, grid=grid)

    monkeypatch.setattr(linear_ops, "call_kernel", spy)
    x, weight = torch.randn(3, 128), torch.randn(700, 128)
    assert_close(ops.bind("emulator").linear(x, weight), F.linear(x, weight), "float32_matmul")
    assert seen == [grid]


def test_a_bad_logical_core_size_names_the_variable(monkeypatch):
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "3")
    with pytest.raises(ValueError, match=r"NEURON_LOGICAL_NC_CONFIG='3'; must be 1 or 2"):
        ops.bind("emulator").linear(torch.randn(1, 128), torch.randn(4, 128))
