"""Static checks of deploy/: manifests parse and agree with each other, scripts are clean shell.

Nothing here needs Docker, a cluster or Trainium. Each test names the inconsistency it would catch.
"""

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse the manifests")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DESIGN_NOTE = REPO / "docs" / "neuron.md"

# Resource names registered by the Neuron device plugin
# (aws-neuron/aws-neuron-sdk: deploy/includes/k8s-neuron-device-plugin.rst).
NEURON_RESOURCES = {"aws.amazon.com/neuron", "aws.amazon.com/neuroncore"}
# In deploy/k8s but deliberately not applied (see the comment in kustomization.yaml).
NOT_IN_KUSTOMIZATION = {"secret.example.yaml", "prometheus-adapter-rules.yaml"}
# The upstream pins everything in deploy/ must agree on (docs/neuron.md, "Versions").
VLLM_NEURON_VERSION = "0.24.0.1.1.0"
NEURON_SDK_VERSION = "2.32.0"
SHELL_SCRIPTS = sorted(DEPLOY.glob("*.sh"))
# First compile of every bucket before /health answers: the probes must allow at least this long.
MIN_STARTUP_BUDGET_S = 30 * 60


def load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_one(path: Path) -> dict:
    docs = load_all(path)
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


@pytest.fixture(scope="module")
def deployment() -> dict:
    return load_one(K8S / "deployment.yaml")


@pytest.fixture(scope="module")
def container(deployment) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "the Deployment should run exactly one container (vllm)"
    return containers[0]


@pytest.fixture(scope="module")
def service() -> dict:
    return load_one(K8S / "service.yaml")


@pytest.fixture(scope="module")
def hpa() -> dict:
    return load_one(K8S / "hpa.yaml")


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_one(DEPLOY / "compose.yaml")


def resolve_port(port, container: dict) -> int:
    """A probe or Service port may be a number or the name of a container port."""
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    assert port in named, f"port name {port!r} is not a container port (have {sorted(named)})"
    return named[port]


# --- YAML and kustomization -----------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml")), ids=lambda p: p.name)
def test_yaml_parses(path):
    docs = load_all(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: top level must be a mapping, got {type(doc).__name__}"


def test_kustomization_lists_existing_files_and_every_manifest():
    kustomization = load_one(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    missing = [r for r in listed if not (K8S / r).is_file()]
    assert not missing, f"kustomization.yaml lists files that do not exist: {missing}"
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"} - NOT_IN_KUSTOMIZATION
    unlisted = sorted(present - set(listed))
    assert not unlisted, f"manifests in deploy/k8s not listed in kustomization.yaml: {unlisted}"


def test_kustomization_renders_with_kubectl():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; the structural tests above still cover the manifests")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(out.stdout) if doc)
    assert kinds == sorted(["ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler"])


# --- labels, selectors, ports ---------------------------------------------------------------------


def test_selectors_match_pod_labels(deployment, service, hpa):
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items(), (
        f"Deployment selector {selector} does not match pod labels {pod_labels}"
    )
    assert service["spec"]["selector"] == selector, "Service must select exactly the Deployment's pods"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert target["apiVersion"] == deployment["apiVersion"]


def test_every_manifest_carries_the_app_labels(deployment):
    app_labels = deployment["metadata"]["labels"]
    for path in sorted(K8S.glob("*.yaml")):
        doc = load_one(path)
        if "metadata" not in doc or doc.get("kind") == "Kustomization":
            continue
        labels = doc["metadata"].get("labels", {})
        assert app_labels.items() <= labels.items(), f"{path.name}: labels {labels} lack {app_labels}"


def test_container_service_and_probe_ports_agree(deployment, container, service):
    (port,) = [p for p in container["ports"] if p["name"] == "http"]
    container_port = port["containerPort"]
    (svc_port,) = service["spec"]["ports"]
    assert resolve_port(svc_port["targetPort"], container) == container_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health", f"{probe} must probe vLLM's /health, not {get['path']}"
        assert resolve_port(get["port"], container) == container_port, f"{probe} probes another port"
    args = container["args"]
    assert args[args.index("--port") + 1] == str(container_port), "vllm serve --port differs from containerPort"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(container_port)


def test_startup_probe_allows_a_first_compile(container):
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= MIN_STARTUP_BUDGET_S, f"startup budget {budget} s < {MIN_STARTUP_BUDGET_S} s"
    # Liveness must not be able to kill a healthy but busy server within one readiness cycle.
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


# --- Neuron resources, secrets, exposure ----------------------------------------------------------


def test_requests_neuron_devices_by_their_documented_names(container):
    resources = container["resources"]
    limits = resources["limits"]
    requested = {k for k in limits if k.startswith("aws.amazon.com/")}
    assert requested, "the container requests no Neuron resource"
    assert requested <= NEURON_RESOURCES, f"unknown Neuron resource names: {requested - NEURON_RESOURCES}"
    for name in requested:
        assert isinstance(limits[name], int) and limits[name] > 0, f"{name} must be a positive integer"
        # Extended resources cannot be overcommitted: a request must equal the limit.
        assert resources.get("requests", {}).get(name, limits[name]) == limits[name]


def test_api_key_comes_from_a_secret(container, deployment):
    env = {e["name"]: e for e in container.get("env", [])}
    assert "VLLM_API_KEY" in env, "the container does not set VLLM_API_KEY"
    key_env = env["VLLM_API_KEY"]
    assert "value" not in key_env, "VLLM_API_KEY must not be a literal value in the manifest"
    ref = key_env["valueFrom"]["secretKeyRef"]
    example = load_one(K8S / "secret.example.yaml")
    assert example["kind"] == "Secret" and example["metadata"]["name"] == ref["name"]
    assert ref["key"] in example["stringData"], f"secret example has no key {ref['key']!r}"
    configmap = load_one(K8S / "configmap.yaml")
    assert not any("API_KEY" in k for k in configmap["data"]), "no API key in the ConfigMap"
    # The example value must be the placeholder the entrypoint refuses to serve with.
    placeholder = example["stringData"][ref["key"]]
    entrypoint = (DEPLOY / "docker-entrypoint.sh").read_text()
    assert f'PLACEHOLDER_KEY="{placeholder}"' in entrypoint


def test_service_is_cluster_ip(service):
    assert service["spec"].get("type") == "ClusterIP", "the Service must not be exposed outside the cluster"


def test_hpa_scales_on_the_queue_length_metric(hpa):
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    rules = load_one(K8S / "prometheus-adapter-rules.yaml")["rules"]["custom"]
    exposed = {rule["name"]["as"]: rule["seriesQuery"] for rule in rules}
    assert name in exposed, f"HPA metric {name!r} is not produced by prometheus-adapter-rules.yaml"
    assert exposed[name].startswith("vllm:num_requests_waiting"), "the HPA must scale on vLLM's queue gauge"


def test_args_only_reference_defined_variables(container):
    configmap = load_one(K8S / "configmap.yaml")
    assert [ref["configMapRef"]["name"] for ref in container["envFrom"]] == [configmap["metadata"]["name"]]
    defined = set(configmap["data"]) | {e["name"] for e in container.get("env", [])}
    used = {m for arg in container["args"] for m in re.findall(r"\$\((\w+)\)", arg)}
    assert used, "expected the serve arguments to come from the ConfigMap"
    assert used <= defined, f"args reference undefined variables: {used - defined}"
    assert container["args"][container["args"].index("--device") + 1] == "neuron"


def test_model_cache_is_a_mounted_claim(container, deployment):
    pvc = load_one(K8S / "pvc.yaml")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claims = {
        n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
    }
    assert claims, "the PVC is not used by the Deployment"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (claim_volume,) = claims
    cache_dir = mounts[claim_volume]
    configmap = load_one(K8S / "configmap.yaml")["data"]
    for var in ("HF_HOME", "VLLM_CACHE_ROOT", "NEURON_COMPILED_ARTIFACTS"):
        assert configmap[var].startswith(cache_dir + "/"), f"{var}={configmap[var]} is not on the cache volume"


# --- compose ---------------------------------------------------------------------------------------


def test_compose_binds_loopback_and_maps_neuron_devices(compose):
    (service,) = compose["services"].values()
    for mapping in service["ports"]:
        assert str(mapping).startswith("127.0.0.1:"), f"compose publishes {mapping} beyond loopback"
    assert service["devices"], "no Neuron device mapped"
    for device in service["devices"]:
        assert re.fullmatch(r"/dev/neuron\d+:/dev/neuron\d+", device), device
    assert "/health" in " ".join(service["healthcheck"]["test"])
    assert any(str(v).endswith(":/cache") for v in service["volumes"]), "no model cache volume"


def test_compose_api_key_is_a_secret_not_a_literal(compose):
    (service,) = compose["services"].values()
    env = service.get("environment", {})
    assert "VLLM_API_KEY" not in env, "the API key must not be written into compose.yaml"
    secret_name = service["secrets"][0]
    assert env["VLLM_API_KEY_FILE"] == f"/run/secrets/{secret_name}"
    assert "file" in compose["secrets"][secret_name]
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert Path(compose["secrets"][secret_name]["file"]).name in ignored, "the key file must be git-ignored"


# --- Dockerfile and version pins -------------------------------------------------------------------


def dockerfile_base_image() -> str:
    text = (DEPLOY / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    (image,) = re.findall(r"^FROM (\S+)", text, flags=re.M)
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)


def test_dockerfile_base_image_is_pinned_to_a_tag():
    image = dockerfile_base_image()
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag, f"base image {image} has no tag"
    assert tag != "latest", "the base image must be pinned, not :latest"
    assert image.startswith("public.ecr.aws/neuron/pytorch-inference-vllm-neuronx:")
    assert VLLM_NEURON_VERSION in tag and f"sdk{NEURON_SDK_VERSION}" in tag


def test_dockerfile_serves_on_the_port_the_manifests_use(container, compose):
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^EXPOSE 8000$", text, flags=re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*http://127\.0\.0\.1:8000/health", text, flags=re.M)
    assert "ENTRYPOINT" in text and "vllm-nki-moe-serve" in text
    assert container["ports"][0]["containerPort"] == 8000
    (service,) = compose["services"].values()
    assert service["ports"][0].endswith(":8000")


def test_versions_agree_across_deploy_and_the_design_note():
    setup = (DEPLOY / "setup-trn2.sh").read_text()
    assert f'VLLM_NEURON_VERSION="{VLLM_NEURON_VERSION}"' in setup
    assert f'NEURON_SDK_VERSION="{NEURON_SDK_VERSION}"' in setup
    if not DESIGN_NOTE.exists():
        pytest.fail("docs/neuron.md is missing")
    note = DESIGN_NOTE.read_text()
    assert dockerfile_base_image() in note, "docs/neuron.md must name the exact base image"
    for pin in re.findall(r'^readonly \w+_VERSION="([\d.]+)"', setup, flags=re.M):
        assert pin in note, f"pinned version {pin} in setup-trn2.sh is not documented in docs/neuron.md"


# --- shell scripts ---------------------------------------------------------------------------------


def test_there_are_scripts_to_check():
    names = {p.name for p in SHELL_SCRIPTS}
    assert {"setup-trn2.sh", "validate-trn2.sh", "docker-entrypoint.sh"} <= names


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_script_is_strict_executable_bash(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (CI: apt-get install -y shellcheck)")
    out = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_setup_help_states_the_pins():
    out = subprocess.run([str(DEPLOY / "setup-trn2.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"Neuron SDK {NEURON_SDK_VERSION}" in out.stdout and f"vllm-neuron {VLLM_NEURON_VERSION}" in out.stdout


# --- validate-trn2.sh behaviour --------------------------------------------------------------------


def read_summary(report: Path) -> dict[str, tuple[str, str]]:
    rows = (report / "summary.tsv").read_text().splitlines()[1:]
    return {r.split("\t")[0]: (r.split("\t")[1], r.split("\t")[4]) for r in rows}


def test_validate_without_neuron_skips_with_reasons_and_exits_2(tmp_path):
    report = tmp_path / "report"
    env = dict(os.environ, VALIDATE_TRN2_DEVICE_GLOB=str(tmp_path / "no-such-neuron*"))
    out = subprocess.run(
        [str(DEPLOY / "validate-trn2.sh"), "--report-dir", str(report)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    summary = read_summary(report)
    assert list(summary) == [
        "environment",
        "preflight",
        "kernels-check",
        "parity",
        "serve-start",
        "loadtest",
        "serve-stop",
    ]
    for step in ("kernels-check", "parity", "serve-start"):
        status, note = summary[step]
        assert status == "SKIP" and "no-such-neuron" in note, (step, status, note)
    assert summary["loadtest"][0] == "SKIP"
    assert (report / "summary.md").is_file()
    assert len(list(report.glob("0*-*.log"))) == 7, "one log per step"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The fake vllm-nki-moe parses its arguments with the real CLI parser (so a flag the script uses and the CLI lacks
# fails here, with argparse's exit 2), answers --help with the real help, and records the call instead of running it.
FAKE_CLI = f"""#!{sys.executable}
import os, sys
from vllm_nki_moe.tools.cli import build_parser
build_parser().parse_args(sys.argv[1:])
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write("fake vllm-nki-moe " + " ".join(sys.argv[1:]) + "\\n")
"""

FAKE_TOOLS = {
    "vllm-nki-moe": FAKE_CLI,
    # `vllm serve ... --port N`: answers GET /health until killed.
    "vllm": """#!/usr/bin/env bash
echo "fake vllm $*" >> "$FAKE_LOG"
port=""; while [[ $# -gt 0 ]]; do [[ "$1" == --port ]] && port="$2"; shift; done
mkdir -p "$FAKE_ROOT/www" && touch "$FAKE_ROOT/www/health"
exec python3 -m http.server --bind 127.0.0.1 --directory "$FAKE_ROOT/www" "$port"
""",
    # Writes the totals of a report.json the way loadtest/report.py shapes them.
    "locust": """#!/usr/bin/env bash
echo "fake locust $*" >> "$FAKE_LOG"
while [[ $# -gt 0 ]]; do [[ "$1" == --report-dir ]] && dir="$2"; shift; done
echo '{"totals": {"score": 1.2345, "requests": 40, "requests_ok": 39, "e2e_ms": {"p99": 812.25},
  "output_tok_s_aggregate": 1500.0}}' > "$dir/report.json"
""",
    # Stands in for the Neuron venv's python: every module "imports"; pip lists two of the SDK's packages.
    "fake-python": """#!/usr/bin/env bash
[[ "$*" == "-m pip list" ]] && printf 'nki                 0.6.0\\nvllm-neuron         0.24.0.1.1.0\\n'
[[ "$1" == main.py ]] && echo "fake python in $PWD: $*" >> "$FAKE_LOG"
exit 0
""",
}


def run_validate_with_fakes(tmp_path, *extra: str):
    """validate-trn2.sh with fakes for the device, SDK, CLI, vllm and locust: (process, report dir, calls, port)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_TOOLS.items():
        tool = bin_dir / name
        tool.write_text(body)
        tool.chmod(0o755)
    (tmp_path / "neuron0").touch()
    repo = tmp_path / "repo"
    (repo / "loadtest").mkdir(parents=True)
    (repo / "loadtest" / "prompts.py").write_text("")
    port = free_port()
    fake_log = tmp_path / "calls.log"
    fake_log.touch()
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHON=str(bin_dir / "fake-python"),
        VALIDATE_TRN2_DEVICE_GLOB=str(tmp_path / "neuron*"),
        FAKE_LOG=str(fake_log),
        FAKE_ROOT=str(tmp_path),
    )
    report = tmp_path / "report"
    args = ["--report-dir", str(report), "--repo", str(repo), "--port", str(port), "--health-timeout", "60", *extra]
    out = subprocess.run(
        [str(DEPLOY / "validate-trn2.sh"), *args], capture_output=True, text=True, timeout=180, env=env
    )
    return out, report, fake_log.read_text(), port


def test_validate_runs_every_step_and_stops_its_server(tmp_path):
    """With fakes for the device, SDK, CLI, vllm and locust, every step runs and the server is stopped."""
    out, report, calls, port = run_validate_with_fakes(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr + (report / "summary.tsv").read_text()
    assert {status for status, _ in read_summary(report).values()} == {"PASS"}
    assert "contest-harness" not in read_summary(report)  # optional: only with --harness
    assert "kernels check --kernels nki --model Qwen/Qwen3-30B-A3B --tensor-parallel-size 4" in calls
    assert "parity --model Qwen/Qwen3-30B-A3B --device neuron --tensor-parallel-size 4 --kernels nki" in calls
    assert f"serve Qwen/Qwen3-30B-A3B --device neuron --tensor-parallel-size 4 --host 127.0.0.1 --port {port}" in calls
    assert (
        f"--headless --mode contest --host http://127.0.0.1:{port} --report-dir {report}/loadtest "
        "--nki-mac-ratio auto --mac-ratio-tp 4" in calls
    )
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the fake server still listens: serve-stop did not stop it"
    summary = (report / "summary.md").read_text()
    assert "| nki | 0.6.0 |" in summary and "| vllm-neuron | 0.24.0.1.1.0 |" in summary
    assert "| contest mode | 1.234 | 39 of 40 | 812.2 | 1500.0 |" in summary


def test_validate_runs_the_contest_harness_on_our_export_when_given_a_checkout(tmp_path):
    harness = tmp_path / "nki-moe"
    harness.mkdir()
    (harness / "main.py").write_text("")
    out, report, calls, _ = run_validate_with_fakes(
        tmp_path, "--harness", str(harness), "--harness-model-path", "/models/Qwen3-30B-A3B"
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert read_summary(report)["contest-harness"] == ("PASS", "")
    assert f"export-contest {harness}/qwen_vllm_nki_moe.py --report --tp 4" in calls  # parsed by the real CLI
    assert (
        f"fake python in {harness}: main.py --mode validate --qwen qwen_vllm_nki_moe --model-path "
        f"/models/Qwen3-30B-A3B --compiled-model-path {report}/harness-traced" in calls
    )


def test_the_contest_harness_step_says_what_it_lacks(tmp_path):
    harness = tmp_path / "empty"
    harness.mkdir()
    out, report, calls, _ = run_validate_with_fakes(tmp_path, "--harness", str(harness))
    assert out.returncode == 2, out.stdout + out.stderr
    status, note = read_summary(report)["contest-harness"]
    assert status == "SKIP" and f"no main.py in {harness}" in note
    assert "export-contest" not in calls


def test_the_fake_cli_is_the_real_parser(tmp_path):
    """A flag the CLI does not have fails in the fake as it would on the host (argparse's usage error, exit 2)."""
    fake = tmp_path / "vllm-nki-moe"
    fake.write_text(FAKE_CLI)
    fake.chmod(0o755)
    env = dict(os.environ, FAKE_LOG=str(tmp_path / "log"))
    ok = subprocess.run([str(fake), "parity", "--model", "m", "--device", "neuron"], env=env, capture_output=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [str(fake), "generate", "--model", "m", "--tensor-parallel-size", "4"], env=env, text=True, capture_output=True
    )
    assert bad.returncode == 2 and "unrecognized arguments: --tensor-parallel-size" in bad.stderr
