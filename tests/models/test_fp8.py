"""FP8 checkpoints (Qwen's block-scaled format): the tiny-model writer, the block math, loading under vLLM with the
weights kept in FP8, greedy parity with Hugging Face loading the same checkpoint (transformers' fine-grained FP8
support, which dequantizes on a machine without a GPU), and the errors for what is not served."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vllm_nki_moe.models.config import read_sizes
from vllm_nki_moe.ops import fp8
from vllm_nki_moe.tools import generate as gen
from vllm_nki_moe.tools import tiny_model

PROMPTS = ["Hello world, the quick brown fox", "def is_palindrome(text):", "A"]
NEW_TOKENS = 12
# (arch, overrides): two FP8 MoE configs (the default; dense layers among MoE ones, unnormalised routing, tied
# embeddings, 16 experts of intermediate 128), and one dense config per dense architecture
CONFIGS = {
    "moe-default": ("qwen3_moe", None),
    "moe-mixed-tied": (
        "qwen3_moe",
        {
            "num_hidden_layers": 3,
            "mlp_only_layers": [1],
            "norm_topk_prob": False,
            "tie_word_embeddings": True,
            "num_experts": 16,
            "num_experts_per_tok": 4,
            "moe_intermediate_size": 128,
        },
    ),
    # head_dim 128 (Qwen3-30B-A3B's): one FP8 block per head, where decode runs the fused attention block
    "moe-head128": (
        "qwen3_moe",
        {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128},
    ),
    "qwen3-dense": ("qwen3", None),
    "llama-dense": ("llama", {"tie_word_embeddings": True}),
}


def _model(make_model, name):
    arch, overrides = CONFIGS[name]
    return make_model(overrides, arch=arch, fp8=True)


# ---------------------------------------------------------------------------------------------------------------------
# the block math


@pytest.mark.parametrize("shape", [(128, 128), (300, 200), (1, 7), (256, 384)])
def test_quantize_then_dequantize_stays_within_e4m3_rounding_of_each_block(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.3
    w[0, 0] = 0.0
    q, scale_inv = fp8.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32
    assert scale_inv.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    back = fp8.dequantize(q, scale_inv, torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of the value (normals), absolute <= 2^-9 * scale (subnormals)
    full_scale = scale_inv.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    assert torch.all((back - w).abs() <= w.abs() / 16 + full_scale * 2**-9 + 1e-12)
    # each block's largest magnitude maps to 448 exactly (up to fp32 division rounding)
    assert torch.allclose(q.float().abs().amax(), torch.tensor(448.0))


def test_dequantize_applies_each_blocks_own_scale():
    q = torch.ones(200, 130).to(torch.float8_e4m3fn)
    scale_inv = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w = fp8.dequantize(q, scale_inv, torch.float32)
    assert w[0, 0] == 1 and w[127, 127] == 1 and w[0, 128] == 2 and w[128, 0] == 3 and w[199, 129] == 4


def test_dequantize_rejects_a_scale_grid_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"scale_inv \(1, 1\); the scales must be .* \[\.\.\., 2, 1\]"):
        fp8.dequantize(torch.zeros(200, 64).to(torch.float8_e4m3fn), torch.ones(1, 1), torch.float32)


def test_expanded_scales_dequantize_as_the_block_grid_for_any_row_range():
    """A rank's rows 192..383 of a 768-row weight (Qwen3-30B-A3B's experts at TP 4, rank 1) start mid-block: its
    expanded scales dequantize exactly those rows of the whole weight."""
    g = torch.Generator().manual_seed(2)
    q, scale_inv = fp8.quantize(torch.randn(768, 300, generator=g))
    whole = fp8.dequantize(q, scale_inv, torch.float32)
    rows = fp8.dequantize_rows(q[192:384], fp8.expand_rows(scale_inv, 192, 192), torch.float32)
    assert torch.equal(rows, whole[192:384])
    qt, st = fp8.quantize(torch.randn(300, 768, generator=g))  # a row-parallel weight: its columns are cut
    cols = fp8.dequantize_cols(qt[:, 192:384], fp8.expand_cols(st, 192, 192), torch.float32)
    assert torch.equal(cols, fp8.dequantize(qt, st, torch.float32)[:, 192:384])
    with pytest.raises(ValueError, match=r"dequantize_rows: weight \(192, 300\) with scales \(1, 3\)"):
        fp8.dequantize_rows(q[192:384], scale_inv[:1], torch.float32)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_experts_load_each_ranks_share_with_its_scales(tp, monkeypatch):
    """Qwen3MoeExperts at every rank of TP 1/2/4 (I = 384: 96 rows per rank at TP 4, mid-block): the dequantized
    stacked weights equal the whole checkpoint weights' shares."""
    from vllm_nki_moe.models import qwen3_moe

    g = torch.Generator().manual_seed(3)
    E, H, inter = 2, 256, 384
    ckpt = {
        (e, proj): fp8.quantize(torch.randn(*shape, generator=g))
        for e in range(E)
        for proj, shape in (("gate_proj", (inter, H)), ("up_proj", (inter, H)), ("down_proj", (H, inter)))
    }
    targets = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", None)}
    monkeypatch.setattr(qwen3_moe, "get_tensor_model_parallel_world_size", lambda: tp)
    for rank in range(tp):
        monkeypatch.setattr(qwen3_moe, "get_tensor_model_parallel_rank", lambda: rank)
        experts = qwen3_moe.Qwen3MoeExperts(E, H, inter, fp8=True)
        for (e, proj), (q, s) in ckpt.items():
            stack, shard = targets[proj]
            experts.load_expert_weight(f"{stack}_weight", e, shard, q)
            experts.load_expert_weight(f"{stack}_weight_scale_inv", e, shard, s)
        rows = slice(rank * inter // tp, (rank + 1) * inter // tp)
        for e in range(E):
            w13 = fp8.dequantize_rows(experts.w13_weight[e], experts.w13_weight_scale_inv[e], torch.float32)
            w2 = fp8.dequantize_cols(experts.w2_weight[e], experts.w2_weight_scale_inv[e], torch.float32)
            whole = {p: fp8.dequantize(*ckpt[(e, p)], torch.float32) for p in targets}
            assert torch.equal(w13, torch.cat((whole["gate_proj"][rows], whole["up_proj"][rows])))
            assert torch.equal(w2, whole["down_proj"][:, rows])


def test_moe_experts_fp8_equals_moe_experts_on_dequantized_weights():
    g = torch.Generator().manual_seed(1)
    E, H, inter, T, K = 6, 128, 96, 5, 2
    w13 = [fp8.quantize(torch.randn(2 * inter, H, generator=g) * 0.2) for _ in range(E)]
    w2 = [fp8.quantize(torch.randn(H, inter, generator=g) * 0.2) for _ in range(E)]
    w13q = torch.stack([q for q, _ in w13])
    w13s = torch.stack([fp8.expand_rows(s, 0, 2 * inter) for _, s in w13])
    w2q = torch.stack([q for q, _ in w2])
    w2s = torch.stack([fp8.expand_cols(s, 0, inter) for _, s in w2])
    x = torch.randn(T, H, generator=g)
    ids = torch.tensor([[0, 3], [3, 5], [5, 0], [3, 3], [1, 0]])
    weights = torch.rand(T, K, generator=g)
    out = fp8.moe_experts_fp8(x, w13q, w13s, w2q, w2s, weights, ids)
    from vllm_nki_moe.ops.moe import moe_experts

    whole13 = torch.stack([fp8.dequantize(q, s, x.dtype) for q, s in w13])
    whole2 = torch.stack([fp8.dequantize(q, s, x.dtype) for q, s in w2])
    torch.testing.assert_close(out, moe_experts(x, whole13, whole2, weights, ids), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# make-tiny-model --fp8


def test_tiny_fp8_checkpoint_has_qwens_tensor_names_dtypes_and_config(make_model):
    model_dir = _model(make_model, "moe-default")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
        "activation_scheme": "dynamic",
    }
    tensors = load_file(str(model_dir / "model.safetensors"))
    p = "model.layers.0"
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.experts.7.gate_proj", "mlp.experts.0.down_proj"):
        assert tensors[f"{p}.{name}.weight"].dtype == torch.float8_e4m3fn
        scale = tensors[f"{p}.{name}.weight_scale_inv"]
        rows, cols = tensors[f"{p}.{name}.weight"].shape
        assert scale.dtype == torch.float32 and scale.shape == (-(-rows // 128), -(-cols // 128))
    unquantized = ("model.embed_tokens.weight", "lm_head.weight", f"{p}.mlp.gate.weight", f"{p}.input_layernorm.weight")
    for name in unquantized + (f"{p}.self_attn.q_norm.weight", "model.norm.weight"):
        assert tensors[name].dtype == torch.float32 and f"{name}_scale_inv" not in tensors
    # the same random weights as the unquantized checkpoint of the seed, up to FP8 rounding
    plain = tiny_model.random_state_dict(tiny_model.build_config(arch="qwen3_moe"), seed=0)
    name = f"{p}.self_attn.k_proj.weight"
    back = fp8.dequantize(tensors[name], tensors[f"{name}_scale_inv"], torch.float32)
    assert (back - plain[name]).abs().max() <= plain[name].abs().max() / 16


def test_tiny_fp8_rejects_sizes_transformers_would_dequantize_on_another_grid(tmp_path):
    with pytest.raises(tiny_model.TinyModelConfigError, match=r"gate_proj.weight has shape \(200, 128\); each dim"):
        tiny_model.make_tiny_model(tmp_path, {"intermediate_size": 200}, arch="qwen3", fp8=True)


# ---------------------------------------------------------------------------------------------------------------------
# parity with Hugging Face


@pytest.mark.parametrize(
    "name, kernels", [(name, "torch") for name in CONFIGS] + [(name, "emulator") for name in CONFIGS]
)
def test_fp8_models_match_hf_loading_the_same_checkpoint(name, kernels, make_model):
    model_dir = _model(make_model, name)
    harness = gen.Harness(model_dir, kernels)
    ours = [harness.generate(p, NEW_TOKENS).tokens for p in PROMPTS]
    layer = harness.model.model.layers[0]
    # one byte per weight, no dequantized copy; under the emulator trn2's FP8 bytes in the kernels' layouts
    fp8_bytes = torch.uint8 if kernels == "emulator" else torch.float8_e4m3fn
    qkv = layer.self_attn.qkv_proj
    assert qkv.weight.dtype == fp8_bytes and qkv.weight.shape == (qkv.output_size_per_partition, qkv.input_size)
    assert layer.self_attn.o_proj.weight_scale_inv.dtype == torch.float32
    if hasattr(layer.mlp, "experts"):
        experts = layer.mlp.experts
        assert experts.w13_weight.dtype == fp8_bytes
        assert experts.w13_weight.element_size() == 1 and experts.w2_weight.element_size() == 1
        assert layer.mlp.gate.weight.dtype == torch.float32  # the router stays unquantized
    assert harness.model.lm_head.weight.dtype == torch.float32
    if kernels == "emulator":
        assert "linear_fp8" in harness.model.opset.kernel_ops
        assert "moe_experts_fp8" in harness.model.opset.kernel_ops
    assert ours == gen.hf_greedy(model_dir, PROMPTS, NEW_TOKENS)


def test_decode_steps_run_every_layer_in_one_kernel(make_model, kernel_launches):
    """head_dim 128 under the emulator, every layer MoE: each decode step launches ``decoder_layers_decode_fp8`` once
    (all layers, their all-reduces inside) and no per-half kernel; the prefill step runs the layers one by one; the
    tokens are those of the ops one by one (torch)."""
    from vllm_nki_moe.ops import attention_block as block_ops
    from vllm_nki_moe.ops import decoder_layers as layers_ops
    from vllm_nki_moe.ops import fp8 as fp8_ops

    model_dir = _model(make_model, "moe-head128")
    launched = kernel_launches(layers_ops)
    attention_halves, moe_halves = kernel_launches(block_ops), kernel_launches(fp8_ops)
    new_tokens = 4
    fused = gen.Harness(model_dir, "emulator").generate(PROMPTS[0], new_tokens).tokens
    # the first token comes from the prefill step, each later one from a decode step
    assert launched == ["decoder_layers_decode_fp8"] * (new_tokens - 1)
    assert "attention_block_decode_fp8" not in attention_halves and "moe_block_decode_fp8" not in moe_halves
    assert moe_halves  # the prefill step's experts went through the FP8 ops (the spy watches)
    assert fused == gen.Harness(model_dir, "torch").generate(PROMPTS[0], new_tokens).tokens


def test_fp8_model_weighs_less_than_the_same_model_unquantized(make_model):
    """fp32 tiny models: the quantized projections and experts take 1 byte per weight plus 4 per 128 x 128 block."""
    arch, overrides = CONFIGS["moe-mixed-tied"]
    quantized = gen.Harness(make_model(overrides, arch=arch, fp8=True), "torch").model
    plain = gen.Harness(make_model(overrides, arch=arch), "torch").model
    fp8_bytes = sum(p.nbytes for p in quantized.parameters())
    plain_bytes = sum(p.nbytes for p in plain.parameters())
    experts = quantized.model.layers[0].mlp.experts
    assert experts.w13_weight.nbytes * 4 == plain.model.layers[0].mlp.experts.w13_weight.nbytes
    assert fp8_bytes < plain_bytes
    print(f"tiny FP8 model {fp8_bytes:,} B of parameters vs {plain_bytes:,} B unquantized (fp32)")


def test_vllm_serves_an_fp8_checkpoint_with_our_quantization_method(make_model):
    from vllm_nki_moe.tools.vllm_greedy import GreedySpec, run_vllm_greedy

    model_dir = _model(make_model, "moe-mixed-tied")
    spec = GreedySpec(model=str(model_dir), prompts=PROMPTS, max_tokens=NEW_TOKENS, enforce_eager=True)
    got = run_vllm_greedy(spec, env={"VLLM_NKI_MOE_KERNELS": "torch"}, timeout=600)
    assert got["quantization"] == "nki_moe_fp8"
    assert got["model_class"] == "vllm_nki_moe.models.qwen3_moe.Qwen3MoeForCausalLM"
    assert got["tokens"] == gen.hf_greedy(model_dir, PROMPTS, NEW_TOKENS)


# ---------------------------------------------------------------------------------------------------------------------
# what is not served


@pytest.mark.parametrize(
    "field, value",
    [
        ("quant_method", "gptq"),
        ("fmt", "e5m2"),
        ("weight_block_size", [64, 64]),
        ("activation_scheme", "static"),
        ("modules_to_not_convert", ["model.layers.0.self_attn.q_proj"]),
        ("modules_to_not_convert", ["model.layers.0.mlp.gate_proj"]),  # not the router gate
    ],
)
def test_unsupported_quantization_fields_fail_at_build_naming_them(field, value):
    config = tiny_model.build_config()
    config.quantization_config = {**fp8_scheme(), field: value}
    with pytest.raises(NotImplementedError, match=rf"quantization_config\.{field}[= ]"):
        read_sizes(config)


def fp8_scheme() -> dict:
    from vllm_nki_moe.models.config import FP8_SCHEME

    return dict(FP8_SCHEME)


def test_modules_kept_unquantized_anyway_may_be_listed():
    config = tiny_model.build_config()
    listed = ["lm_head", "model.embed_tokens", "model.layers.0.mlp.gate", "model.layers.1.input_layernorm"]
    config.quantization_config = {**fp8_scheme(), "modules_to_not_convert": listed}
    assert read_sizes(config).fp8


def test_missing_scale_tensors_fail_at_load_naming_them(make_model, tmp_path):
    import shutil

    from safetensors.torch import save_file

    source = _model(make_model, "qwen3-dense")
    model_dir = tmp_path / "no-scales"
    shutil.copytree(source, model_dir)
    tensors = load_file(str(model_dir / "model.safetensors"))
    del tensors["model.layers.1.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks .*model.layers.1.self_attn.o_proj.weight_scale_inv"):
        gen.Harness(model_dir, "torch")


def test_fp8_scales_in_an_unquantized_checkpoint_are_named(make_model, tmp_path):
    import shutil

    source = _model(make_model, "moe-default")
    model_dir = tmp_path / "no-config"
    shutil.copytree(source, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    del config["quantization_config"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weight_scale_inv' has no parameter"):
        gen.Harness(model_dir, "torch")
