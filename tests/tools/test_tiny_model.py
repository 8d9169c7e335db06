"""`vllm-nki-moe make-tiny-model`: a checkpoint shaped like Qwen/Qwen3-30B-A3B's that transformers loads."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from vllm_nki_moe.tools.cli import main as cli_main

# The tensor names of Qwen/Qwen3-30B-A3B's checkpoint (model.safetensors.index.json), as patterns.
QWEN3_30B_A3B_NAME_PATTERNS = [
    r"model\.embed_tokens\.weight",
    r"model\.norm\.weight",
    r"lm_head\.weight",
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight",
    r"model\.layers\.\d+\.self_attn\.(q|k)_norm\.weight",
    r"model\.layers\.\d+\.mlp\.gate\.weight",
    r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight",
]
DENSE_MLP_PATTERN = r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight"  # Qwen3 dense layers (mlp_only_layers)


def tensor_names(model_dir) -> dict[str, tuple[int, ...]]:
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def test_default_checkpoint_has_qwen3_30b_a3b_tensor_names(tiny_model_dir):
    names = tensor_names(tiny_model_dir)
    unmatched = [n for n in names if not any(re.fullmatch(p, n) for p in QWEN3_30B_A3B_NAME_PATTERNS)]
    assert unmatched == []
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["head_dim"] == 64
    assert config["num_experts_per_tok"] >= 2
    experts = {int(m[1]) for n in names if (m := re.search(r"experts\.(\d+)\.", n))}
    assert experts == set(range(8))
    assert names["model.layers.0.mlp.experts.3.gate_proj.weight"] == (64, 128)
    assert names["model.layers.0.mlp.experts.3.down_proj.weight"] == (128, 64)


def test_checkpoint_has_tokenizer_chat_template_and_generation_config(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("The quick brown fox").input_ids) == "The quick brown fox"
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]


def test_transformers_loads_every_tensor(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with safe_open(tiny_model_dir / "model.safetensors", "pt") as f:
        gate_up = torch.cat(
            [
                f.get_tensor("model.layers.1.mlp.experts.5.gate_proj.weight"),
                f.get_tensor("model.layers.1.mlp.experts.5.up_proj.weight"),
            ]
        )
    # transformers fuses the per-expert tensors on load; the values must arrive unchanged.
    torch.testing.assert_close(model.model.layers[1].mlp.experts.gate_up_proj[5], gate_up, rtol=0, atol=0)


def test_config_overrides_are_honoured_including_dense_layers(tmp_path):
    overrides = {
        "num_hidden_layers": 4,
        "mlp_only_layers": [0],
        "decoder_sparse_step": 2,
        "num_experts": 12,
        "num_experts_per_tok": 3,
        "norm_topk_prob": False,
        "head_dim": 32,
        "rope_theta": 5000.0,
        "rms_norm_eps": 1e-5,
        "intermediate_size": 96,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(overrides))
    assert (
        cli_main(["make-tiny-model", str(tmp_path / "m"), "--config", str(tmp_path / "cfg.json"), "--seed", "3"]) == 0
    )
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for key in (
        "num_hidden_layers",
        "mlp_only_layers",
        "decoder_sparse_step",
        "num_experts_per_tok",
        "norm_topk_prob",
        "head_dim",
        "rms_norm_eps",
        "intermediate_size",
    ):
        assert config[key] == overrides[key], key
    assert config["rope_parameters"]["rope_theta"] == 5000.0
    names = tensor_names(tmp_path / "m")
    # Layer 0: listed dense; layer 2: off the sparse step (3 % 2 != 0); layers 1 and 3: MoE with 12 experts.
    for layer, dense in ((0, True), (1, False), (2, True), (3, False)):
        has_dense = any(re.fullmatch(DENSE_MLP_PATTERN, n) for n in names if n.startswith(f"model.layers.{layer}."))
        assert has_dense == dense, layer
        assert (f"model.layers.{layer}.mlp.gate.weight" in names) == (not dense)
    assert names["model.layers.1.mlp.gate.weight"] == (12, 128)
    assert names["model.layers.0.mlp.gate_proj.weight"] == (96, 128)


def test_seed_changes_weights_and_is_reproducible(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert cli_main(["make-tiny-model", str(tmp_path / name), "--seed", str(seed)]) == 0
    w = {n: safe_open(tmp_path / n / "model.safetensors", "pt").get_tensor("lm_head.weight") for n in "abc"}
    assert torch.equal(w["a"], w["b"]) and not torch.equal(w["a"], w["c"])


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"num_experts": 8,', "invalid JSON at line 1"),
        ("[1, 2]", "expected a JSON object"),
        ('{"num_expert": 8}', "unknown Qwen3MoeConfig field(s) ['num_expert']"),
        ('{"num_experts_per_tok": 9, "num_experts": 8}', "num_experts_per_tok=9; must not exceed num_experts=8"),
        ('{"num_attention_heads": 6, "num_key_value_heads": 4}', "must be a multiple of num_key_value_heads=4"),
        ('{"hidden_size": 0}', "hidden_size=0; must be a positive integer"),
        ('{"mlp_only_layers": [5]}', "mlp_only_layers=[5]"),
        ('{"vocab_size": 10}', "vocab_size=10; the tokenizer needs at least"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, capsys, content, message):
    (tmp_path / "cfg.json").write_text(content)
    assert cli_main(["make-tiny-model", str(tmp_path / "m"), "--config", str(tmp_path / "cfg.json")]) == 2
    assert message in capsys.readouterr().err


def test_missing_config_file_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["make-tiny-model", str(tmp_path / "m"), "--config", str(tmp_path / "nope.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
