#!/usr/bin/env bash
# Set up .venv/ (first run only) and serve the embedded tiny Qwen3-MoE with `vllm serve` on 127.0.0.1:8000 through
# this plugin. Extra arguments go to `vllm serve` (e.g. --port 8001). VLLM_NKI_MOE_KERNELS=emulator runs the NKI
# kernels in the NumPy emulator instead of PyTorch.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup-venv.sh"

model=${VLLM_NKI_MOE_MODEL:-$repo/models/tiny-qwen3-moe}
if [ ! -f "$model/config.json" ]; then
  "$repo/.venv/bin/vllm-nki-moe" make-tiny-model "$model"
fi

# KV cache in GiB: vLLM's CPU default sizes it from free memory (~12 GiB, ~20 s to set up); the tiny model needs little.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec "$repo/.venv/bin/vllm" serve "$model" \
  --served-model-name tiny-qwen3-moe \
  --host 127.0.0.1 --port 8000 \
  --device cpu \
  --dtype float32 \
  --max-model-len 2048 \
  "$@"
