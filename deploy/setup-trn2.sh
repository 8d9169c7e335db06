#!/usr/bin/env bash
# Prepare a trn2 host to serve vllm-nki-moe: Neuron driver/runtime/tools, a Python venv with the vLLM
# Neuron stack, and this package. Idempotent: every step checks first and says what it did or skipped.
#
# Two starting points (aws-neuron-sdk: vllm-neuron/docs/getting-started/setup-guide.md):
#   * Neuron DLAMI "Deep Learning AMI Neuron PyTorch Inference vLLM 0.24.0.1.1.0 (Ubuntu 24.04)" or the
#     multi-framework DLAMI: driver and venv are preinstalled; we only add this package to that venv.
#   * Plain Ubuntu 24.04: we add the Neuron apt/pip repositories and install the pinned versions below.
#
# Pins: Neuron SDK 2.32.0, from aws-neuron-sdk src/helperscripts/n2-manifest.json (release 2.32.0) and
# release-notes/releasecontent.rst; the same versions are baked into AWS's vLLM Neuron image
# (aws-neuron/deep-learning-containers vllm/inference/0.24.0.1.1.0/Dockerfile.neuronx).
set -euo pipefail

readonly NEURON_SDK_VERSION="2.32.0"
readonly VLLM_NEURON_VERSION="0.24.0.1.1.0"   # vllm-neuron plugin; pins vllm==0.24.0
readonly DKMS_VERSION="2.30.2.0"
readonly RUNTIME_LIB_VERSION="2.34.10.0"
readonly COLLECTIVES_VERSION="2.34.10.0"
readonly TOOLS_VERSION="2.32.28.0"
readonly NEURONX_CC_VERSION="2.27.5334.0"
readonly NKI_VERSION="0.6.0"
readonly LIBTORCH_NEURONX_LITE_VERSION="2.11.0.1.0.1284"
readonly NEURON_APT_REPO="https://apt.repos.neuron.amazonaws.com"
readonly NEURON_PIP_REPO="https://pip.repos.neuron.amazonaws.com"
readonly DLAMI_VENV="/opt/aws_neuronx_venv_pytorch_inference_vllm_0_24_0_1_1_0"
readonly DEFAULT_VENV="/opt/vllm-nki-moe-venv"

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV=""
SKIP_DRIVER=0
DRY_RUN=0
DONE=()

usage() {
    cat <<USAGE
Usage: deploy/setup-trn2.sh [--venv DIR] [--repo DIR] [--skip-driver] [--dry-run]

Sets up a trn2 host for vllm-nki-moe with Neuron SDK ${NEURON_SDK_VERSION} and vllm-neuron ${VLLM_NEURON_VERSION}:
  apt  aws-neuronx-dkms=${DKMS_VERSION} aws-neuronx-runtime-lib=${RUNTIME_LIB_VERSION}
       aws-neuronx-collectives=${COLLECTIVES_VERSION} aws-neuronx-tools=${TOOLS_VERSION}
  pip  neuronx-cc==${NEURONX_CC_VERSION} nki==${NKI_VERSION}
       libtorch-neuronx-lite==${LIBTORCH_NEURONX_LITE_VERSION} vllm-neuron==${VLLM_NEURON_VERSION}
       and this package (REPO with the [neuron] extra), pinned against what the venv already has.

  --venv DIR     Python venv to use (default: the DLAMI vLLM venv ${DLAMI_VENV} if present,
                 else ${DEFAULT_VENV}, created with python3 >= 3.11)
  --repo DIR     vllm-nki-moe checkout to install (default: ${REPO_DIR})
  --skip-driver  do not touch apt packages (containers, or hosts managed elsewhere)
  --dry-run      print each action instead of running it
USAGE
}

log() { echo "[setup-trn2] $*"; }
die() { echo "[setup-trn2] error: $*" >&2; exit 1; }
did() {
    local what="$*"
    [[ "${DRY_RUN}" == "1" ]] && what="(dry run, not done) ${what}"
    DONE+=("${what}")
    log "${what}"
}

run() {
    if [[ "${DRY_RUN}" == "1" ]]; then
        echo "[setup-trn2] would run: $*"
    else
        "$@"
    fi
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --venv) VENV="${2:?--venv needs a directory}"; shift 2 ;;
        --repo) REPO_DIR="${2:?--repo needs a directory}"; shift 2 ;;
        --skip-driver) SKIP_DRIVER=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    SUDO=(sudo)
fi

[[ -f "${REPO_DIR}/setup.py" || -f "${REPO_DIR}/pyproject.toml" ]] \
    || die "--repo ${REPO_DIR} is not a vllm-nki-moe checkout (no setup.py or pyproject.toml)"

# --- 1. Where are we? --------------------------------------------------------------------------
# shellcheck disable=SC1091  # os-release is a system file, present on every supported host
. /etc/os-release
log "host: ${PRETTY_NAME:-unknown}, kernel $(uname -r)"
if [[ -z "${VENV}" ]]; then
    if [[ -x "${DLAMI_VENV}/bin/python" ]]; then
        VENV="${DLAMI_VENV}"
        log "found the Neuron DLAMI vLLM venv: ${VENV}"
    else
        VENV="${DEFAULT_VENV}"
    fi
fi
ON_DLAMI=0
[[ "${VENV}" == "${DLAMI_VENV}" ]] && ON_DLAMI=1

# --- 2. Neuron driver, runtime and tools (apt) ----------------------------------------------------
installed_version() {  # prints the installed version of a deb package, or nothing
    dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true
}

if [[ "${SKIP_DRIVER}" == "1" ]]; then
    log "skipping apt packages (--skip-driver)"
elif [[ "${ON_DLAMI}" == "1" ]]; then
    log "skipping apt packages: the DLAMI ships the driver and runtime of its SDK release"
else
    [[ "${ID:-}" == "ubuntu" && "${VERSION_ID:-}" == "24.04" ]] \
        || die "plain-host setup supports Ubuntu 24.04 only (found ${PRETTY_NAME:-unknown}); use the Neuron DLAMI"
    if [[ ! -f /etc/apt/sources.list.d/neuron.list ]]; then
        run "${SUDO[@]}" mkdir -p /etc/apt/keyrings
        if [[ "${DRY_RUN}" == "1" ]]; then
            echo "[setup-trn2] would fetch ${NEURON_APT_REPO}/GPG-PUB-KEY-AMAZON-AWS-NEURON.PUB into /etc/apt/keyrings/neuron.gpg"
        else
            curl -fsSL "${NEURON_APT_REPO}/GPG-PUB-KEY-AMAZON-AWS-NEURON.PUB" \
                | gpg --dearmor | "${SUDO[@]}" tee /etc/apt/keyrings/neuron.gpg > /dev/null
            echo "deb [signed-by=/etc/apt/keyrings/neuron.gpg] ${NEURON_APT_REPO} ${VERSION_CODENAME} main" \
                | "${SUDO[@]}" tee /etc/apt/sources.list.d/neuron.list > /dev/null
        fi
        did "added the Neuron apt repository (${VERSION_CODENAME})"
    else
        log "Neuron apt repository already configured"
    fi
    wanted=(
        "aws-neuronx-dkms=${DKMS_VERSION}"
        "aws-neuronx-runtime-lib=${RUNTIME_LIB_VERSION}"
        "aws-neuronx-collectives=${COLLECTIVES_VERSION}"
        "aws-neuronx-tools=${TOOLS_VERSION}"
    )
    to_install=()
    for spec in "${wanted[@]}"; do
        pkg="${spec%%=*}"
        want="${spec#*=}"
        have="$(installed_version "${pkg}")"
        if [[ "${have}" == "${want}"* ]]; then
            log "${pkg} ${have} already installed"
        else
            to_install+=("${pkg}=${want}*")
        fi
    done
    if [[ ${#to_install[@]} -gt 0 ]]; then
        run "${SUDO[@]}" apt-get update
        run "${SUDO[@]}" apt-get install -y "linux-headers-$(uname -r)" "${to_install[@]}"
        did "installed ${to_install[*]}"
    fi
fi

# --- 3. Python venv with the vLLM Neuron stack (pip) ----------------------------------------------
if [[ ! -x "${VENV}/bin/python" ]]; then
    PY="$(command -v python3 || true)"
    [[ -n "${PY}" ]] || die "python3 not found"
    "${PY}" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
        || die "vllm-neuron ${VLLM_NEURON_VERSION} needs Python >= 3.11; ${PY} is $("${PY}" --version)"
    run "${SUDO[@]}" "${PY}" -m venv "${VENV}"
    run "${SUDO[@]}" chown -R "$(id -u):$(id -g)" "${VENV}"
    did "created venv ${VENV}"
else
    log "using existing venv ${VENV}"
fi
PIP=("${VENV}/bin/python" -m pip)

pip_has() {  # pip_has NAME VERSION: is exactly that version installed in the venv?
    [[ -x "${VENV}/bin/python" ]] || return 1
    "${VENV}/bin/python" - "$1" "$2" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    have = version(sys.argv[1])
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if have.split("+")[0] == sys.argv[2] else 1)
PY
}

neuron_pips=(
    "neuronx-cc==${NEURONX_CC_VERSION}"
    "nki==${NKI_VERSION}"
    "libtorch-neuronx-lite==${LIBTORCH_NEURONX_LITE_VERSION}"
    "vllm-neuron==${VLLM_NEURON_VERSION}"
)
missing=()
for spec in "${neuron_pips[@]}"; do
    if pip_has "${spec%%==*}" "${spec#*==}"; then
        log "${spec} already installed"
    else
        missing+=("${spec}")
    fi
done
if [[ ${#missing[@]} -gt 0 ]]; then
    # The real nki / neuronx-cc wheels exist only on the Neuron index (PyPI holds placeholders), so that
    # index comes first.
    if ! run "${PIP[@]}" install --index-url "${NEURON_PIP_REPO}" --extra-index-url https://pypi.org/simple \
        "${missing[@]}"; then
        # releasecontent.rst lists the vllm-neuron wheel for 2.32.0; if the index lacks it, use the
        # release branch, as AWS's image build does (GITHUB_REPO_BRANCH in its Dockerfile).
        log "retrying with vllm-neuron from its release branch release-${VLLM_NEURON_VERSION}"
        others=()
        for spec in "${missing[@]}"; do
            [[ "${spec}" == vllm-neuron==* ]] || others+=("${spec}")
        done
        run "${PIP[@]}" install --index-url "${NEURON_PIP_REPO}" --extra-index-url https://pypi.org/simple \
            "${others[@]}" \
            "vllm-neuron @ git+https://github.com/vllm-project/vllm-neuron.git@release-${VLLM_NEURON_VERSION}"
    fi
    did "installed ${missing[*]}"
fi

# --- 4. This package, without disturbing the stack above ----------------------------------------
constraints="$(mktemp)"
trap 'rm -f "${constraints}"' EXIT
if [[ -x "${VENV}/bin/python" ]]; then
    "${PIP[@]}" list --format=freeze | grep -v -i '^vllm-nki-moe==' > "${constraints}" || true
fi
run "${PIP[@]}" install --constraint "${constraints}" --extra-index-url "${NEURON_PIP_REPO}" "${REPO_DIR}[neuron]"
did "installed vllm-nki-moe from ${REPO_DIR} into ${VENV}"

# --- 5. Check ----------------------------------------------------------------------------------
if [[ "${DRY_RUN}" == "0" ]]; then
    "${VENV}/bin/python" -c "import vllm, vllm_neuron, vllm_nki_moe; print('vllm', vllm.__version__)" \
        || die "the venv cannot import vllm, vllm_neuron and vllm_nki_moe together"
fi
if compgen -G "/dev/neuron*" > /dev/null; then
    if command -v neuron-ls > /dev/null; then
        neuron-ls
    else
        log "neuron-ls not on PATH (it lives in /opt/aws/neuron/bin)"
    fi
else
    log "warning: no /dev/neuron* devices: not a Trainium host, or the driver needs a reboot (dmesg | grep neuron)"
fi

log "summary:"
if [[ ${#DONE[@]} -eq 0 ]]; then
    log "  nothing to change"
else
    for item in "${DONE[@]}"; do log "  - ${item}"; done
fi
cat <<NEXT
[setup-trn2] next:
  source ${VENV}/bin/activate
  export VLLM_PLUGINS=nki_moe,nki_moe_models   # vLLM accepts one platform plugin; ours wraps vllm-neuron's
  vllm serve Qwen/Qwen3-30B-A3B --device neuron --tensor-parallel-size 4
  deploy/validate-trn2.sh                      # the one-command hardware validation
NEXT
