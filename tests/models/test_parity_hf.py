"""Our Qwen3-MoE class under vLLM gives Hugging Face transformers' greedy tokens (float32), config by config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vllm_nki_moe.tools.vllm_greedy import GreedySpec, run_vllm_greedy

PROMPTS = [
    "Hello world, the quick brown fox",
    "On the first day of Christmas my true love sent to me",
    "def is_palindrome(text):",
    "A",
]
NEW_TOKENS = 24

CONFIGS = {
    "default": None,
    # Dense MLP layers (mlp_only_layers and decoder_sparse_step) and un-normalised routing weights.
    "dense-layers-no-renorm": {"num_hidden_layers": 3, "mlp_only_layers": [1], "norm_topk_prob": False},
    # Other shapes: more experts and a larger top-k, MQA (1 kv head), head_dim 32, every other layer sparse,
    # tied embeddings, another rope theta and eps.
    "wide-router-mqa": {
        "hidden_size": 96,
        "num_attention_heads": 6,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 48,
        "intermediate_size": 160,
        "num_hidden_layers": 4,
        "decoder_sparse_step": 2,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
    },
}


def hf_greedy(model_dir: Path, prompts: list[str], new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: always generate new_tokens
    results = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0, attention_mask=torch.ones_like(ids)
            )
        results.append(out[0, ids.shape[1] :].tolist())
    return results


def vllm_greedy(
    model_dir: Path,
    prompts: list[str],
    new_tokens: int,
    kernels: str = "torch",
    additional_config: dict | None = None,
    compiled: bool = False,
) -> dict:
    """vLLM offline generation in a fresh process: eager (``enforce_eager``), or ``compiled``, vLLM's default mode
    (Dynamo traces our decoder stack once, Inductor compiles it; a graph break fails the run)."""
    spec = GreedySpec(
        model=str(model_dir),
        prompts=prompts,
        max_tokens=new_tokens,
        additional_config=additional_config or {},
        enforce_eager=not compiled,
    )
    return run_vllm_greedy(spec, env={"VLLM_NKI_MOE_KERNELS": kernels}, timeout=600)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_vllm_with_our_model_matches_hf_greedy(name, compiled, make_model):
    model_dir = make_model(CONFIGS[name])
    expected = hf_greedy(model_dir, PROMPTS, NEW_TOKENS)
    got = vllm_greedy(model_dir, PROMPTS, NEW_TOKENS, compiled=compiled)
    assert got["model_class"] == "vllm_nki_moe.models.qwen3_moe.Qwen3MoeForCausalLM"
    assert got["opset"] == "torch"
    assert all(len(t) == NEW_TOKENS for t in expected)
    assert got["tokens"] == expected


def test_additional_config_chooses_the_kernels_over_the_environment(make_model):
    model_dir = make_model(None)
    got = vllm_greedy(
        model_dir, PROMPTS[:2], 8, kernels="torch", additional_config={"nki_moe": {"kernels": "emulator"}}
    )
    assert got["opset"] == "emulator"
    assert got["tokens"] == [t[:8] for t in hf_greedy(model_dir, PROMPTS[:2], 8)]
