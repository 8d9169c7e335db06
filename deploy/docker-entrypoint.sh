#!/usr/bin/env bash
# Container entrypoint: checks the API key, selects our vLLM plugins, then execs `vllm serve "$@"`.
#
# Environment:
#   VLLM_API_KEY        the key clients must send (vLLM reads it; /health and /metrics stay open)
#   VLLM_API_KEY_FILE   a file holding the key (compose/k8s secrets); read into VLLM_API_KEY
#   VLLM_NKI_MOE_ALLOW_NO_API_KEY=1   serve without a key (only behind a trusted proxy)
#   VLLM_PLUGINS        defaults to our two plugins only: the upstream `neuron` platform plugin would
#                       also activate on a Neuron host, and vLLM refuses two active platform plugins
#                       (see docs/neuron.md, "Two platform plugins").
set -euo pipefail

readonly PLACEHOLDER_KEY="REPLACE-WITH-A-RANDOM-KEY"

die() {
    echo "vllm-nki-moe-serve: $*" >&2
    exit 64  # EX_USAGE: the container is misconfigured, restarting it will not help
}

if [[ -n "${VLLM_API_KEY_FILE:-}" ]]; then
    [[ -r "${VLLM_API_KEY_FILE}" ]] || die "VLLM_API_KEY_FILE=${VLLM_API_KEY_FILE} is not a readable file"
    VLLM_API_KEY="$(tr -d '\r\n' < "${VLLM_API_KEY_FILE}")"
    export VLLM_API_KEY
fi

if [[ -z "${VLLM_API_KEY:-}" ]]; then
    [[ "${VLLM_NKI_MOE_ALLOW_NO_API_KEY:-0}" == "1" ]] \
        || die "no API key: set VLLM_API_KEY or VLLM_API_KEY_FILE (or VLLM_NKI_MOE_ALLOW_NO_API_KEY=1)"
elif [[ "${VLLM_API_KEY}" == "${PLACEHOLDER_KEY}" ]]; then
    die "VLLM_API_KEY is the example placeholder from deploy/k8s/secret.example.yaml; create a real secret"
fi

export VLLM_PLUGINS="${VLLM_PLUGINS:-nki_moe,nki_moe_models}"

echo "vllm-nki-moe-serve: VLLM_PLUGINS=${VLLM_PLUGINS} VLLM_NKI_MOE_KERNELS=${VLLM_NKI_MOE_KERNELS:-auto}" >&2
exec vllm serve "$@"
