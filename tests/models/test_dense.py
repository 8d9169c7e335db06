"""Dense decoders on the shared layers (models/dense.py): Qwen3 and Llama 3 give Hugging Face's greedy tokens through
our modules (generate harness: every op through ``ops``, our paged cache), on torch ops and on our NKI kernels in the
emulator; unsupported config fields fail at model build."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from vllm_nki_moe.models.config import read_sizes
from vllm_nki_moe.ops.rope import llama3_inv_freq, rope_cos_sin_cache
from vllm_nki_moe.tools import generate as gen
from vllm_nki_moe.tools import tiny_model

PROMPTS = ["Hello world, the quick brown fox", "def is_palindrome(text):"]
NEW_TOKENS = 24
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500_000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,  # tiny, so the scaling bends the frequencies these prompts use
}
# (arch, overrides): two configs per architecture
CONFIGS = {
    "qwen3-default": ("qwen3", None),
    "qwen3-tied-gqa4": ("qwen3", {"tie_word_embeddings": True, "num_attention_heads": 8, "num_key_value_heads": 2}),
    "llama-default": ("llama", None),
    # Llama 3.2 1B's features: tied embeddings, llama3 RoPE scaling, GQA groups of 4
    "llama-3.2-like": (
        "llama",
        {
            "tie_word_embeddings": True,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "rope_parameters": LLAMA3_ROPE,
        },
    ),
}


@pytest.mark.parametrize("kernels", ["torch", "emulator"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_dense_models_match_hf_greedy(name, kernels, make_model):
    arch, overrides = CONFIGS[name]
    model_dir = make_model(overrides, arch=arch)
    expected = gen.hf_greedy(model_dir, PROMPTS, NEW_TOKENS)
    harness = gen.Harness(model_dir, kernels)
    assert type(harness.model).__name__ == tiny_model.ARCHS[arch][1]
    assert [harness.generate(p, NEW_TOKENS).tokens for p in PROMPTS] == expected


def test_llama_has_no_qk_norm_and_qwen3_dense_no_experts(make_model):
    llama = gen.Harness(make_model(None, arch="llama"), "torch").model
    attn = llama.model.layers[0].self_attn
    assert not attn.qk_norm and not hasattr(attn, "q_norm")
    qwen3 = gen.Harness(make_model(None, arch="qwen3"), "torch").model
    assert qwen3.model.layers[0].self_attn.qk_norm
    assert all(type(layer.mlp).__name__ == "Qwen3MoeMLP" for layer in qwen3.model.layers)


def test_llama3_rope_matches_transformers_frequencies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, rope_parameters=dict(LLAMA3_ROPE))
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (500_000.0 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))
    ours = llama3_inv_freq(base, 32.0, 1.0, 4.0, 8)
    torch.testing.assert_close(ours, hf_inv_freq, rtol=0, atol=0)
    assert not torch.equal(ours, base)  # the scaling changed something at these sizes
    cache = rope_cos_sin_cache(128, 16, 500_000.0, (32.0, 1.0, 4.0, 8))
    torch.testing.assert_close(cache[5, :64], (5 * hf_inv_freq).cos(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "arch, field, value, message",
    [
        (
            "qwen3",
            "rope_parameters",
            {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0},
            "rope_type='yarn'; supported: default",
        ),
        (
            "llama",
            "rope_parameters",
            {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
            "supported: default, llama3",
        ),
        ("llama", "mlp_bias", True, "mlp_bias=True; only bias-free MLPs"),
    ],
)
def test_unsupported_dense_config_fields_fail_at_build_naming_them(arch, field, value, message, tmp_path):
    config = tiny_model.build_config(arch=arch)
    config_dict = config.to_dict() | {field: value}
    (tmp_path / "config.json").write_text(json.dumps(config_dict))
    loaded = AutoConfig.from_pretrained(tmp_path)
    with pytest.raises((ValueError, NotImplementedError), match=rf"{tiny_model.ARCHS[arch][1]} \(vllm_nki_moe\): .*"):
        read_sizes(loaded, architecture=tiny_model.ARCHS[arch][1])
    with pytest.raises((ValueError, NotImplementedError)) as err:
        read_sizes(loaded, architecture=tiny_model.ARCHS[arch][1])
    assert message in str(err.value)


def test_an_architecture_we_do_not_serve_is_named():
    from vllm_nki_moe.plugin import model_class

    with pytest.raises(ValueError, match=r"architecture 'MistralForCausalLM'; supported: Qwen3MoeForCausalLM"):
        model_class("MistralForCausalLM")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", ["qwen3-tied-gqa4", "llama-3.2-like"])
def test_vllm_serves_the_dense_models_with_our_classes_matching_hf(name, compiled, make_model):
    from vllm_nki_moe.tools.vllm_greedy import GreedySpec, run_vllm_greedy

    arch, overrides = CONFIGS[name]
    model_dir = make_model(overrides, arch=arch)
    expected = gen.hf_greedy(model_dir, PROMPTS, NEW_TOKENS)
    spec = GreedySpec(model=str(model_dir), prompts=PROMPTS, max_tokens=NEW_TOKENS, enforce_eager=not compiled)
    got = run_vllm_greedy(spec, env={"VLLM_NKI_MOE_KERNELS": "torch"}, timeout=600)
    assert got["model_class"] == f"vllm_nki_moe.models.dense.{tiny_model.ARCHS[arch][1]}"
    assert got["tokens"] == expected


def test_vllm_serves_llama_on_emulated_nki_kernels_matching_hf(make_model):
    from vllm_nki_moe.tools.vllm_greedy import GreedySpec, run_vllm_greedy

    arch, overrides = CONFIGS["llama-3.2-like"]
    model_dir = make_model(overrides, arch=arch)
    expected = [t[:8] for t in gen.hf_greedy(model_dir, PROMPTS, 8)]
    spec = GreedySpec(model=str(model_dir), prompts=PROMPTS, max_tokens=8, enforce_eager=True)
    got = run_vllm_greedy(spec, env={"VLLM_NKI_MOE_KERNELS": "emulator"}, timeout=600)
    assert got["opset"] == "emulator"
    assert got["tokens"] == expected
