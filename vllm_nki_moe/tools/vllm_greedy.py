"""Greedy generation through vLLM's own offline engine (``vllm.LLM``), in a fresh process per run.

A fresh process because vLLM's engine and its distributed state are process-wide, and because the platform (CPU or
Neuron) is chosen once per process from ``VLLM_NKI_MOE_DEVICE``. ``run_vllm_greedy`` starts
``python -m vllm_nki_moe.tools.vllm_greedy SPEC_JSON`` and reads back the one ``RESULT {json}`` line it prints:
the token ids per prompt, the model class vLLM built and the kernel backend it bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field

from vllm_nki_moe import envs

RESULT_PREFIX = "RESULT "


@dataclass(frozen=True)
class GreedySpec:
    model: str
    prompts: list[str]
    max_tokens: int
    device: str = "cpu"  # cpu | neuron: the platform our plugin serves on (VLLM_NKI_MOE_DEVICE)
    kernels: str | None = None  # the nki_moe kernels backend (additional_config); None: the platform's default
    dtype: str = "float32"
    tensor_parallel_size: int = 1
    max_model_len: int = 512
    enforce_eager: bool = True  # False: vLLM's default compiled mode
    additional_config: dict = field(default_factory=dict)


class VllmRunError(RuntimeError):
    """vLLM's run failed; the message ends with the tail of its stderr."""


def run_vllm_greedy(spec: GreedySpec, *, env: dict | None = None, timeout: float = 3600) -> dict:
    """Run ``spec`` in a fresh process; returns ``{"tokens", "model_class", "opset"}``."""
    child_env = {**os.environ, **(env or {}), envs.DEVICE_ENV: spec.device}
    if spec.device == "cpu":  # one process, a small KV cache: ../shared/research/cpu-setup.md traps 4 and 5
        child_env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        child_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    proc = subprocess.run(
        [sys.executable, "-m", __name__, json.dumps(asdict(spec))],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=timeout,
    )
    result = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not result:
        raise VllmRunError(f"vLLM run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result[-1][len(RESULT_PREFIX) :])


def _built_model(llm):
    """The model vLLM built, when the engine runs in this process (else None: multiprocessing, several ranks)."""
    try:
        return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    except AttributeError:
        return None


def _main(spec: GreedySpec) -> None:
    from vllm import LLM, SamplingParams

    additional = dict(spec.additional_config)
    if spec.kernels is not None:
        additional.setdefault(envs.ADDITIONAL_CONFIG_SECTION, {})["kernels"] = spec.kernels
    extra = {"additional_config": additional} if additional else {}  # vLLM rejects None
    llm = LLM(
        model=spec.model,
        dtype=spec.dtype,
        tensor_parallel_size=spec.tensor_parallel_size,
        max_model_len=spec.max_model_len,
        enforce_eager=spec.enforce_eager,
        seed=0,
        **extra,
    )
    outputs = llm.generate(spec.prompts, SamplingParams(temperature=0, max_tokens=spec.max_tokens, ignore_eos=True))
    model = _built_model(llm)
    result = {
        "model_class": None if model is None else f"{type(model).__module__}.{type(model).__qualname__}",
        "opset": getattr(getattr(model, "opset", None), "backend", None),
        "quantization": llm.llm_engine.vllm_config.model_config.quantization,
        "weight_bytes": None if model is None else sum(p.nbytes for p in model.parameters()),
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    _main(GreedySpec(**json.loads(sys.argv[1])))
