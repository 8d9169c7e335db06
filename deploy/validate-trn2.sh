#!/usr/bin/env bash
# One-command hardware validation of vllm-nki-moe on a trn2 host. Writes one report directory:
#   summary.md, summary.tsv (step, status, seconds, log, note) and one log per step.
# Steps: environment, preflight, kernels-check, parity, serve-start, loadtest, serve-stop; with --harness DIR also
# contest-harness (the MLSys 2026 harness, aws-neuron/nki-moe, run on our export-contest drop-in).
# A step that cannot run here (no /dev/neuron*, SDK missing, a CLI subcommand or flag not available
# yet) is recorded as SKIP with the reason; the other steps still run when they can.
# Exit status: 0 every step passed; 1 a step failed; 2 nothing failed but some step could not run.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="Qwen/Qwen3-30B-A3B"
TP=4
PORT=8011
HEALTH_TIMEOUT=3600   # seconds; first start compiles every bucket (a budget, never measured)
LOADTEST_TIMEOUT=7200
PYTHON="${PYTHON:-python3}"
# Where Neuron device files appear; overridable only so tests can exercise the script without hardware.
DEVICE_GLOB="${VALIDATE_TRN2_DEVICE_GLOB:-/dev/neuron*}"
REPORT_DIR=""
SERVE_EXTRA_ARGS=()
HARNESS_DIR=""         # an aws-neuron/nki-moe checkout: adds the contest-harness step
HARNESS_MODEL_PATH=""  # the Hugging Face checkpoint directory the harness loads (its --model-path)
HARNESS_MODULE="qwen_vllm_nki_moe"  # the drop-in's module name in the harness checkout (its own files stay)

usage() {
    cat <<USAGE
Usage: deploy/validate-trn2.sh [--report-dir DIR] [--model ID] [--tensor-parallel-size N] [--port N]
                               [--health-timeout SECONDS] [--repo DIR]
                               [--harness NKI_MOE_CHECKOUT --harness-model-path HF_DIR] [-- EXTRA VLLM SERVE ARGS]

Runs on a trn2 host with the Neuron SDK venv active (deploy/setup-trn2.sh):
  kernels-check  vllm-nki-moe kernels check --kernels nki --model MODEL --tensor-parallel-size N
                 (every kernel on the Neuron device at the model's per-rank shapes, against its reference)
  parity         vllm-nki-moe parity --model MODEL --device neuron --tensor-parallel-size N --kernels nki
                 (vLLM on Neuron vs Hugging Face greedy on the host CPU, a few prompts)
  serve-start    vllm serve MODEL --device neuron --tensor-parallel-size N on 127.0.0.1:PORT, wait for /health
  loadtest       locust -f loadtest/prompts.py --headless --mode contest --report-dir REPORT/loadtest
                 --nki-mac-ratio auto (the ratio computed from the served checkpoint's config)
  serve-stop     stops the server this script started
  contest-harness  (only with --harness) vllm-nki-moe export-contest HARNESS/${HARNESS_MODULE}.py --report --tp N,
                 then in HARNESS: python main.py --mode validate --qwen ${HARNESS_MODULE} --model-path HF_DIR
                 --compiled-model-path REPORT/harness-traced (the harness's accuracy check on our drop-in)
Defaults: --model ${MODEL} --tensor-parallel-size ${TP} --port ${PORT} --health-timeout ${HEALTH_TIMEOUT}
Exit: 0 all passed, 1 a step failed, 2 no failure but some step could not run (reasons in summary.md).
USAGE
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --report-dir) REPORT_DIR="${2:?--report-dir needs a directory}"; shift 2 ;;
        --model) MODEL="${2:?--model needs a model id or path}"; shift 2 ;;
        --tensor-parallel-size|--tp) TP="${2:?--tensor-parallel-size needs a number}"; shift 2 ;;
        --port) PORT="${2:?--port needs a number}"; shift 2 ;;
        --health-timeout) HEALTH_TIMEOUT="${2:?--health-timeout needs seconds}"; shift 2 ;;
        --repo) REPO_DIR="${2:?--repo needs a directory}"; shift 2 ;;
        --harness) HARNESS_DIR="${2:?--harness needs an aws-neuron/nki-moe checkout}"; shift 2 ;;
        --harness-model-path) HARNESS_MODEL_PATH="${2:?--harness-model-path needs a directory}"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; SERVE_EXTRA_ARGS=("$@"); break ;;
        *) usage >&2; echo "validate-trn2: unknown argument: $1" >&2; exit 64 ;;
    esac
done

REPORT_DIR="${REPORT_DIR:-${PWD}/validate-report-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "${REPORT_DIR}"
REPORT_DIR="$(cd "${REPORT_DIR}" && pwd)"
SUMMARY_TSV="${REPORT_DIR}/summary.tsv"
printf 'step\tstatus\tseconds\tlog\tnote\n' > "${SUMMARY_TSV}"
STEP_NO=0
ANY_FAIL=0
ANY_SKIP=0
SERVER_PID=""

say() { echo "[validate-trn2] $*"; }

record() {  # record STEP STATUS SECONDS LOG NOTE
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5//$'\t'/ }" >> "${SUMMARY_TSV}"
    case "$2" in
        FAIL) ANY_FAIL=1 ;;
        SKIP) ANY_SKIP=1 ;;
    esac
    say "$1: $2${5:+ ($5)}"
}

# run_step NAME SKIP_REASON CMD...: runs CMD with its output in the step log, unless SKIP_REASON is set.
run_step() {
    local name="$1" skip_reason="$2" log rc start
    shift 2
    STEP_NO=$((STEP_NO + 1))
    log="$(printf '%s/%02d-%s.log' "${REPORT_DIR}" "${STEP_NO}" "${name}")"
    if [[ -n "${skip_reason}" ]]; then
        echo "skipped: ${skip_reason}" > "${log}"
        record "${name}" SKIP 0 "$(basename "${log}")" "${skip_reason}"
        return 0
    fi
    echo "\$ $*" > "${log}"
    start="${SECONDS}"
    set +e
    "$@" >> "${log}" 2>&1
    rc=$?
    set -e
    if [[ ${rc} -eq 0 ]]; then
        record "${name}" PASS "$((SECONDS - start))" "$(basename "${log}")" ""
    elif [[ ${rc} -eq 2 ]]; then
        record "${name}" FAIL "$((SECONDS - start))" "$(basename "${log}")" \
            "exit 2: usually a command-line usage error; see the log"
    else
        record "${name}" FAIL "$((SECONDS - start))" "$(basename "${log}")" "exit ${rc}"
    fi
}

# --- environment (always runs; records what is here) ---------------------------------------------
environment() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    if [[ -r /etc/os-release ]]; then grep -E '^(PRETTY_NAME|VERSION_ID)=' /etc/os-release; fi
    echo "repo: ${REPO_DIR} @ $(git -C "${REPO_DIR}" rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout')"
    echo "model: ${MODEL}  tensor parallel: ${TP}  port: ${PORT}"
    echo "--- devices"
    compgen -G "${DEVICE_GLOB}" || echo "no ${DEVICE_GLOB} device files"
    echo "--- neuron-ls"
    if command -v neuron-ls > /dev/null; then neuron-ls || true; else echo "neuron-ls not on PATH"; fi
    echo "--- python: $(command -v "${PYTHON}" || echo "${PYTHON} not found")"
    "${PYTHON}" --version 2>&1 || true
    "${PYTHON}" -m pip list 2>/dev/null \
        | grep -i -E '^(vllm|vllm-neuron|vllm-nki-moe|nki|neuronx-cc|libtorch-neuronx-lite|torch|torch-neuronx|transformers|locust) ' \
        | tee "${REPORT_DIR}/versions.txt" || echo "pip list unavailable"
    echo "--- environment"
    env | grep -E '^(VLLM_|NEURON_|NKI_|HF_HOME)' | grep -v -E '^VLLM_API_KEY' | sort || true
}
run_step environment "" environment

# --- preflight: decide what can run ---------------------------------------------------------------
NO_DEVICE=""
compgen -G "${DEVICE_GLOB}" > /dev/null \
    || NO_DEVICE="no ${DEVICE_GLOB} device files: not a Trainium host, or the Neuron driver (aws-neuronx-dkms) is not loaded"

# pin_of MODULE: the pip requirement deploy/setup-trn2.sh installs for MODULE (its readonly *_VERSION pins).
pin_of() {
    local package variable version
    case "$1" in
        nki) package=nki; variable=NKI_VERSION ;;
        neuronxcc) package=neuronx-cc; variable=NEURONX_CC_VERSION ;;
        libtorch_neuronx_lite) package=libtorch-neuronx-lite; variable=LIBTORCH_NEURONX_LITE_VERSION ;;
        vllm_neuron) package=vllm-neuron; variable=VLLM_NEURON_VERSION ;;
        vllm) echo "vllm (pinned by vllm-neuron)"; return 0 ;;
        *) echo "$1"; return 0 ;;
    esac
    version="$(sed -n "s/^readonly ${variable}=\"\([^\"]*\)\".*/\1/p" "${REPO_DIR}/deploy/setup-trn2.sh" 2>/dev/null)"
    echo "${package}==${version:-?}"
}

missing_modules=()
for module in vllm vllm_neuron nki neuronxcc libtorch_neuronx_lite vllm_nki_moe; do
    "${PYTHON}" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('${module}') else 1)" \
        2>/dev/null || missing_modules+=("${module} ($(pin_of "${module}"))")
done
NO_SDK=""
if [[ ${#missing_modules[@]} -gt 0 ]]; then
    NO_SDK="python modules not importable with ${PYTHON}: ${missing_modules[*]}; install them with deploy/setup-trn2.sh"
fi

HW_REASON="${NO_DEVICE}${NO_DEVICE:+${NO_SDK:+; }}${NO_SDK}"

# cli_reason SUBCOMMAND... -- FLAG...: empty if `vllm-nki-moe SUBCOMMAND --help` works and lists every FLAG.
cli_reason() {
    local sub=() flags=() help
    while [[ $# -gt 0 && "$1" != "--" ]]; do sub+=("$1"); shift; done
    [[ $# -gt 0 ]] && shift
    flags=("$@")
    command -v vllm-nki-moe > /dev/null || { echo "vllm-nki-moe is not on PATH"; return 0; }
    if ! help="$(vllm-nki-moe "${sub[@]}" --help 2>&1)"; then
        echo "'vllm-nki-moe ${sub[*]}' is not available in this version"
        return 0
    fi
    for flag in "${flags[@]}"; do
        grep -q -- "${flag}" <<< "${help}" || { echo "'vllm-nki-moe ${sub[*]}' has no ${flag} option yet"; return 0; }
    done
}

preflight() {
    echo "device: ${NO_DEVICE:-ok}"
    echo "sdk: ${NO_SDK:-ok}"
    echo "kernels check cli: $(cli_reason kernels check -- --kernels --model --tensor-parallel-size)"
    echo "parity cli: $(cli_reason parity -- --model --device --tensor-parallel-size --kernels)"
    echo "vllm: $(command -v vllm || echo 'not on PATH')"
    echo "locust: $(command -v locust || echo 'not on PATH')"
    echo "loadtest: $([[ -f "${REPO_DIR}/loadtest/prompts.py" ]] && echo ok || echo "no ${REPO_DIR}/loadtest/prompts.py")"
    # Preflight itself only fails if the host cannot be examined at all.
    true
}
run_step preflight "" preflight

first_reason() {  # prints the first non-empty argument
    local r
    for r in "$@"; do
        if [[ -n "${r}" ]]; then echo "${r}"; return 0; fi
    done
}

# --- kernels on device, at the model's per-rank shapes -------------------------------------------
run_step kernels-check "$(first_reason "${HW_REASON}" "$(cli_reason kernels check -- --kernels --model --tensor-parallel-size)")" \
    vllm-nki-moe kernels check --kernels nki --model "${MODEL}" --tensor-parallel-size "${TP}"

# --- model parity: our model with NKI kernels vs Hugging Face transformers -----------------------
run_step parity "$(first_reason "${HW_REASON}" "$(cli_reason parity -- --model --device --tensor-parallel-size --kernels)")" \
    vllm-nki-moe parity --model "${MODEL}" --device neuron --tensor-parallel-size "${TP}" --kernels nki

# --- serve --------------------------------------------------------------------------------------
BASE_URL="http://127.0.0.1:${PORT}"

stop_server() {
    [[ -n "${SERVER_PID}" ]] || return 0
    if kill -0 "${SERVER_PID}" 2>/dev/null; then
        # setsid made the server a process-group leader: signal its group (engine and workers).
        kill -TERM -- "-${SERVER_PID}" 2>/dev/null || kill -TERM "${SERVER_PID}" 2>/dev/null || true
        for _ in $(seq 1 60); do
            kill -0 "${SERVER_PID}" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "${SERVER_PID}" 2>/dev/null; then
            echo "server did not exit within 60 s of SIGTERM; sending SIGKILL"
            kill -KILL -- "-${SERVER_PID}" 2>/dev/null || kill -KILL "${SERVER_PID}" 2>/dev/null || true
        fi
    fi
    wait "${SERVER_PID}" 2>/dev/null || true
    echo "server (pid ${SERVER_PID}) stopped"
    SERVER_PID=""
}
trap stop_server EXIT
trap 'stop_server; exit 130' INT TERM

serve_start() {
    local server_log="$1" waited=0
    if curl -fsS "${BASE_URL}/health" > /dev/null 2>&1; then
        echo "something already answers on ${BASE_URL}; choose another --port"
        return 1
    fi
    # Loopback only and no API key: the server lives for this script only.
    local cmd=(vllm serve "${MODEL}" --device neuron --tensor-parallel-size "${TP}"
               --host 127.0.0.1 --port "${PORT}" "${SERVE_EXTRA_ARGS[@]}")
    echo "\$ VLLM_PLUGINS=nki_moe,nki_moe_models VLLM_NKI_MOE_KERNELS=nki ${cmd[*]}  (log: $(basename "${server_log}"))"
    env -u VLLM_API_KEY VLLM_PLUGINS=nki_moe,nki_moe_models VLLM_NKI_MOE_KERNELS=nki \
        setsid "${cmd[@]}" > "${server_log}" 2>&1 &
    SERVER_PID=$!
    echo "server pid ${SERVER_PID}; waiting up to ${HEALTH_TIMEOUT} s for ${BASE_URL}/health"
    until curl -fsS "${BASE_URL}/health" > /dev/null 2>&1; do
        if ! kill -0 "${SERVER_PID}" 2>/dev/null; then
            echo "server exited before /health answered; last lines of its log:"
            tail -n 40 "${server_log}"
            SERVER_PID=""
            return 1
        fi
        if [[ ${waited} -ge ${HEALTH_TIMEOUT} ]]; then
            echo "no /health after ${HEALTH_TIMEOUT} s; last lines of the server log:"
            tail -n 40 "${server_log}"
            return 1
        fi
        sleep 2
        waited=$((waited + 2))
    done
    echo "healthy after ~${waited} s"
}

SERVE_REASON="$(first_reason "${HW_REASON}" "$(command -v vllm > /dev/null || echo 'vllm is not on PATH')")"
SERVER_LOG="${REPORT_DIR}/server.log"
run_step serve-start "${SERVE_REASON}" serve_start "${SERVER_LOG}"
SERVE_OK=0
if [[ -n "${SERVER_PID}" ]] && tail -n 1 "${SUMMARY_TSV}" | grep -q $'^serve-start\tPASS'; then
    SERVE_OK=1
fi

# --- load test in the contest's terms ----------------------------------------------------------
LOADTEST_REASON="$(first_reason \
    "$([[ ${SERVE_OK} -eq 1 ]] || echo "no server: serve-start did not pass")" \
    "$(command -v locust > /dev/null || echo 'locust is not on PATH')" \
    "$([[ -f "${REPO_DIR}/loadtest/prompts.py" ]] || echo "no ${REPO_DIR}/loadtest/prompts.py")")"
mkdir -p "${REPORT_DIR}/loadtest"
run_step loadtest "${LOADTEST_REASON}" \
    timeout "${LOADTEST_TIMEOUT}" locust -f "${REPO_DIR}/loadtest/prompts.py" --headless --mode contest \
    --host "${BASE_URL}" --report-dir "${REPORT_DIR}/loadtest" --nki-mac-ratio auto --mac-ratio-tp "${TP}"

# --- stop ---------------------------------------------------------------------------------------
if [[ -n "${SERVER_PID}" ]]; then
    run_step serve-stop "" stop_server
else
    run_step serve-stop "no server was started by this script" true
fi

# --- the contest harness on our drop-in (optional; after our server has released the cores) -------
harness_run() {
    vllm-nki-moe export-contest "${HARNESS_DIR}/${HARNESS_MODULE}.py" --report --tp "${TP}" || return 1
    (cd "${HARNESS_DIR}" && "${PYTHON}" main.py --mode validate --qwen "${HARNESS_MODULE}" \
        --model-path "${HARNESS_MODEL_PATH}" --compiled-model-path "${REPORT_DIR}/harness-traced")
}

if [[ -n "${HARNESS_DIR}" ]]; then
    HARNESS_REASON="$(first_reason \
        "$([[ -f "${HARNESS_DIR}/main.py" ]] || echo "no main.py in ${HARNESS_DIR} (--harness wants an aws-neuron/nki-moe checkout)")" \
        "$([[ -n "${HARNESS_MODEL_PATH}" ]] || echo '--harness needs --harness-model-path (the Hugging Face checkpoint directory)')" \
        "${HW_REASON}" \
        "$(cli_reason export-contest -- --report --tp)")"
    run_step contest-harness "${HARNESS_REASON}" harness_run
fi

# --- report -------------------------------------------------------------------------------------
# loadtest_scores REPORT_JSON: the load test's totals (loadtest/report.py) as a table row, or why there are none.
loadtest_scores() {
    if [[ ! -f "$1" ]]; then
        echo "Load test: no report (the loadtest step did not write $1)."
        return 0
    fi
    python3 - "$1" <<'PY' || echo "Load test: $1 could not be read."
import json, sys
t = json.load(open(sys.argv[1]))["totals"]
fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)
e2e = (t.get("e2e_ms") or {}).get("p99")
print("| load test | score | requests ok | p99 e2e ms | output tok/s |")
print("|---|---|---|---|---|")
print(f"| contest mode | {fmt(t.get('score'), '{:.4g}')} | {t['requests_ok']} of {t['requests']} | {fmt(e2e)} "
      f"| {fmt(t.get('output_tok_s_aggregate'))} |")
PY
}

{
    echo "# vllm-nki-moe trn2 validation"
    echo
    echo "Model \`${MODEL}\`, tensor parallel ${TP}, report \`${REPORT_DIR}\`, $(date -u +%Y-%m-%dT%H:%M:%SZ)."
    echo
    echo "| step | status | seconds | log | note |"
    echo "|---|---|---|---|---|"
    tail -n +2 "${SUMMARY_TSV}" | while IFS=$'\t' read -r step status secs log note; do
        echo "| ${step} | ${status} | ${secs} | ${log} | ${note} |"
    done
    echo
    echo "| package | version |"
    echo "|---|---|"
    if [[ -s "${REPORT_DIR}/versions.txt" ]]; then
        while read -r package version _; do echo "| ${package} | ${version} |"; done < "${REPORT_DIR}/versions.txt"
    else
        echo "| (none found) | ${PYTHON} -m pip list showed none of the packages looked for |"
    fi
    echo
    loadtest_scores "${REPORT_DIR}/loadtest/report.json"
} > "${REPORT_DIR}/summary.md"

say "report: ${REPORT_DIR}/summary.md"
if [[ ${ANY_FAIL} -eq 1 ]]; then
    say "result: FAILED"
    exit 1
elif [[ ${ANY_SKIP} -eq 1 ]]; then
    say "result: INCOMPLETE (some steps could not run here; see the notes)"
    exit 2
fi
say "result: PASSED"
