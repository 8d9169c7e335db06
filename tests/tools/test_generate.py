"""`vllm-nki-moe generate`: our Qwen3-MoE modules with every op through `ops` (NKI kernels in the emulator, or torch)
and our paged KV cache give exactly Hugging Face transformers' greedy tokens (float32, EOS ignored).

In-process: the harness builds vLLM's distributed state for one process once and reuses it across models.
"""

from __future__ import annotations

import pytest
import torch

from vllm_nki_moe.ops import attention as attention_ops
from vllm_nki_moe.ops import kernel_call
from vllm_nki_moe.ops import linear as linear_ops
from vllm_nki_moe.ops import moe as moe_ops
from vllm_nki_moe.tools import cli
from vllm_nki_moe.tools import generate as gen

PROMPTS = ["Hello world, the quick brown fox", "def is_palindrome(text):", "A"]
NEW_TOKENS = 32
CONFIGS = {
    "default": None,
    # dense MLP layers (mlp_only_layers) and un-normalised routing weights
    "dense-layers-no-renorm": {"num_hidden_layers": 3, "mlp_only_layers": [1], "norm_topk_prob": False},
    # head_dim 128 (Qwen3-30B-A3B's): decode steps run the attention half as one kernel (attention_block_decode)
    "head128": {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128},
}


@pytest.fixture(scope="module")
def hf_tokens(make_model):
    cache: dict[str, list[list[int]]] = {}

    def get(name: str) -> list[list[int]]:
        if name not in cache:
            cache[name] = gen.hf_greedy(make_model(CONFIGS[name]), PROMPTS, NEW_TOKENS)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_on_emulated_nki_kernels_matches_hf_greedy(name, make_model, hf_tokens):
    harness = gen.Harness(make_model(CONFIGS[name]), "emulator")
    assert {"attention_prefill", "attention_decode"} <= set(harness.opset.kernel_ops)
    got = [harness.generate(p, NEW_TOKENS).tokens for p in PROMPTS]
    assert got == hf_tokens(name)


def test_generate_on_emulated_kernels_at_lnc_2_matches_hf_greedy(make_model, hf_tokens, monkeypatch):
    """Every kernel written for a grid runs as two programs (one per physical core of an LNC=2 logical core)."""
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "2")
    launched = []
    real = kernel_call.call_kernel

    def spy(backend, kernel, *args, grid=1, **kwargs):
        launched.append((kernel.__name__, grid))
        return real(backend, kernel, *args, grid=grid, **kwargs)

    for module in (attention_ops, linear_ops, moe_ops):
        monkeypatch.setattr(module, "call_kernel", spy)
    harness = gen.Harness(make_model(CONFIGS["default"]), "emulator")
    assert [harness.generate(p, NEW_TOKENS).tokens for p in PROMPTS] == hf_tokens("default")
    grids = dict(launched)
    for name in ("linear", "attention_decode", "moe_block_decode", "moe_prefill"):
        assert grids.get(name) == 2, (name, sorted(grids.items()))


def test_decode_steps_run_the_fused_attention_half_at_head_dim_128(make_model, hf_tokens, monkeypatch):
    """head_dim 128 under the emulator at LNC 2: every decode step runs attention_block_decode once per layer after
    the first (which has no residual to add) on two programs; prefill runs the ops one by one; tokens as HF's."""
    from vllm_nki_moe.ops import attention_block as block_ops

    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "2")
    launched = []
    real = kernel_call.call_kernel

    def spy(backend, kernel, *args, grid=1, **kwargs):
        launched.append((kernel.__name__, grid))
        return real(backend, kernel, *args, grid=grid, **kwargs)

    for module in (attention_ops, block_ops):
        monkeypatch.setattr(module, "call_kernel", spy)
    model_dir = make_model(CONFIGS["head128"])
    harness = gen.Harness(model_dir, "emulator")
    got = harness.generate(PROMPTS[0], NEW_TOKENS).tokens
    assert got == hf_tokens("head128")[0]
    layers = harness.model.sizes.num_hidden_layers
    blocks = [grid for name, grid in launched if name == "attention_block_decode"]
    assert len(blocks) == (NEW_TOKENS - 1) * (layers - 1) and set(blocks) == {2}
    # the first layer's decode attention and every prefill run the attention kernels
    assert sum(name == "attention_decode" for name, _ in launched) == NEW_TOKENS - 1


def test_generate_on_torch_ops_matches_hf_greedy(make_model, hf_tokens):
    harness = gen.Harness(make_model(CONFIGS["default"]), "torch")
    assert harness.opset.kernel_ops == ()
    assert [harness.generate(p, NEW_TOKENS).tokens for p in PROMPTS] == hf_tokens("default")


def test_paged_cache_scatters_a_sequences_blocks_out_of_order():
    cache = gen.PagedKVCache(num_layers=1, kv_heads=1, head_dim=4, block_size=4, max_tokens=64, dtype=torch.float32)
    positions, slots = cache.append(13)
    assert positions.tolist() == list(range(13))
    assert len(cache.blocks) == 4 and cache.num_blocks > 2 * len(cache.blocks)
    assert sorted(cache.blocks) != cache.blocks or any(b - a != 1 for a, b in zip(cache.blocks, cache.blocks[1:]))
    assert slots.tolist() == [cache.blocks[p // 4] * 4 + p % 4 for p in range(13)]
    assert cache.step["phase"] == "prefill"
    _, slots = cache.append(1)
    assert cache.step["phase"] == "decode" and cache.step["context_lens"].tolist() == [14]
    assert slots.tolist() == [cache.blocks[3] * 4 + 1]


def test_cli_generate_compare_hf_prints_match_and_exits_zero(tiny_model_dir, capsys):
    argv = ["generate", "--model", str(tiny_model_dir), "--kernels", "torch", "--prompt", "A", "--max-new-tokens", "8"]
    assert cli.main([*argv, "--compare-hf"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "Hugging Face: match (8 tokens)" in out


def test_cli_generate_compare_hf_names_the_first_mismatch_and_exits_nonzero(tiny_model_dir, capsys, monkeypatch):
    real = gen.hf_greedy

    def altered(*args, **kwargs):
        tokens = real(*args, **kwargs)
        tokens[0][5] += 1
        return tokens

    monkeypatch.setattr(gen, "hf_greedy", altered)
    argv = ["generate", "--model", str(tiny_model_dir), "--kernels", "torch", "--prompt", "A", "--max-new-tokens", "8"]
    assert cli.main([*argv, "--compare-hf"]) == 1
    assert "MISMATCH at new token 5" in capsys.readouterr().out


@pytest.mark.parametrize("kernels", ["torch", "emulator"])
def test_cli_generate_compile_reports_one_graph_per_bucket_and_matches_hf(kernels, make_model, capsys):
    # The MQA config with a dense layer: more shape buckets (a 2-block prompt, decode growing to a third block).
    model = make_model(CONFIGS["dense-layers-no-renorm"])
    argv = ["generate", "--model", str(model), "--kernels", kernels, "--prompt", PROMPTS[1], "--max-new-tokens", "6"]
    assert cli.main([*argv, "--block-size", "4", "--compile", "--compare-hf"]) == 0
    out = capsys.readouterr().out
    reports = [line for line in out.splitlines() if line.startswith("compile: ")]
    assert any(" prefill " in line for line in reports) and any(" decode " in line for line in reports)
    assert all(line.endswith(": 1 graph(s), 0 graph break(s)") for line in reports), reports
    assert "Hugging Face: match (6 tokens)" in out


def test_cli_generate_compile_exits_nonzero_on_a_graph_break(tiny_model_dir, capsys, monkeypatch):
    from vllm_nki_moe.models.qwen3_moe import Qwen3MoeForCausalLM

    real = Qwen3MoeForCausalLM.forward

    def forward_with_a_break(self, *args, **kwargs):
        hidden = real(self, *args, **kwargs)
        torch._dynamo.graph_break()  # what a .item() or a print in forward would do
        return hidden + 0

    monkeypatch.setattr(Qwen3MoeForCausalLM, "forward", forward_with_a_break)
    argv = ["generate", "--model", str(tiny_model_dir), "--kernels", "torch", "--prompt", "A", "--max-new-tokens", "2"]
    assert cli.main([*argv, "--compile"]) == 1
    reports = [line for line in capsys.readouterr().out.splitlines() if line.startswith("compile: ")]
    assert reports and all(line.endswith("graph(s), 1 graph break(s)") for line in reports), reports
