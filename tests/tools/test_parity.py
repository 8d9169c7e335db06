"""``vllm-nki-moe parity``: vLLM's engine with our model against Hugging Face, the validation script's parity step.

On this machine it runs for real on the CPU platform (the tiny checkpoint); on Neuron the same command takes
``--device neuron --tensor-parallel-size N``.
"""

from __future__ import annotations

import pytest

from vllm_nki_moe.tools import parity
from vllm_nki_moe.tools.cli import main


def test_vllm_on_cpu_matches_hugging_face_in_float32(tiny_model_dir, capsys):
    argv = [
        "parity",
        "--model",
        str(tiny_model_dir),
        "--dtype",
        "float32",
        "--kernels",
        "torch",
        "--max-new-tokens",
        "6",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "vLLM on cpu TP=1 (model vllm_nki_moe.models.qwen3_moe.Qwen3MoeForCausalLM, kernels torch)" in out
    assert out.count(": match (6 tokens)") == len(parity.DEFAULT_PROMPTS)
    assert f"parity: {len(parity.DEFAULT_PROMPTS)} of {len(parity.DEFAULT_PROMPTS)} prompts match" in out


def test_a_mismatch_names_the_prompt_and_token_and_exits_1(tiny_model_dir, monkeypatch, capsys):
    from vllm_nki_moe.tools import generate

    real = generate.hf_greedy

    def shifted(model, prompts, n, dtype="float32"):  # Hugging Face disagreeing from the third token of prompt 1
        out = real(model, prompts, n, dtype=dtype)
        out[1][2] += 1
        return out

    monkeypatch.setattr(generate, "hf_greedy", shifted)
    argv = ["parity", "--model", str(tiny_model_dir), "--dtype", "float32", "--kernels", "torch"]
    assert main([*argv, "--max-new-tokens", "4"]) == 1
    out = capsys.readouterr().out
    assert "[1] 'def fibonacci(n):': MISMATCH at new token 2" in out and "parity: 2 of 3 prompts match" in out


@pytest.mark.parametrize(
    "flag, value, message",
    [("--tensor-parallel-size", "0", "--tensor-parallel-size=0"), ("--max-new-tokens", "0", "--max-new-tokens=0")],
)
def test_bad_numbers_are_clear_errors(flag, value, message, capsys):
    assert main(["parity", "--model", "unused", flag, value]) == 2
    assert f"error: parity: {message}; must be a positive integer" in capsys.readouterr().out


def test_a_vllm_that_cannot_start_is_exit_2_with_its_error(tmp_path, capsys):
    assert main(["parity", "--model", str(tmp_path / "missing"), "--max-new-tokens", "2"]) == 2
    assert "error: parity: vLLM run failed" in capsys.readouterr().out
