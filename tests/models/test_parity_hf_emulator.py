"""With ``VLLM_NKI_MOE_KERNELS=emulator`` (our NKI kernels run in the NumPy emulator inside vLLM), the model still
gives Hugging Face transformers' greedy tokens on the float32 tiny models (the helpers of ``test_parity_hf``)."""

from __future__ import annotations

import pytest

from .test_parity_hf import CONFIGS, NEW_TOKENS, PROMPTS, hf_greedy, vllm_greedy

# float32 end to end: the kernels differ from torch only by fp32 summation order / rsqrt / reciprocal rounding
# (a few ulps, kernel_check.tolerances "float32"), far below the logit gaps greedy decoding depends on.


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_vllm_with_emulator_kernels_matches_hf_greedy(name, compiled, make_model):
    model_dir = make_model(CONFIGS[name])
    expected = hf_greedy(model_dir, PROMPTS, NEW_TOKENS)
    got = vllm_greedy(model_dir, PROMPTS, NEW_TOKENS, kernels="emulator", compiled=compiled)
    assert got["opset"] == "emulator"
    assert got["tokens"] == expected
