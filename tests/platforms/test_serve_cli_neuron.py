"""``vllm serve`` itself with the fake Neuron SDK on PYTHONPATH: our platform resolves, and --device neuron exists."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests import fakes
from tests.conftest import VLLM

# vllm-neuron's CPU mode (VLLM_NEURON_CPU_MODE=1) lets its register() activate without /dev/neuron*, so the real
# vLLM resolves our platform here; the help text is printed after the platform's pre_register_and_update.
TIMEOUT_S = 120  # an import of vLLM takes ~10 s here


def vllm_serve_help(site, **env) -> subprocess.CompletedProcess:
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("VLLM_NKI_MOE", "VLLM_NEURON", "VLLM_PLUGINS"))
    }
    full_env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        VLLM_NKI_MOE_DEVICE="neuron",
        VLLM_NEURON_CPU_MODE="1",
        **env,
    )
    return subprocess.run(
        [str(VLLM), "serve", "--help=all"], capture_output=True, text=True, timeout=TIMEOUT_S, env=full_env
    )


@pytest.fixture
def fake_site(tmp_path):
    install = fakes.FakeInstall(tmp_path, fakes.SDK_FILES)
    yield tmp_path
    install.remove()


def test_vllm_serve_resolves_our_neuron_platform_and_offers_device_neuron(fake_site):
    proc = vllm_serve_help(fake_site, VLLM_PLUGINS="nki_moe,nki_moe_models")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--device {auto,cpu,neuron}" in proc.stdout
    # Upstream's hook ran, and only through our subclass: VLLM_PLUGINS kept vLLM from loading upstream's plugin.
    assert fakes.PRE_REGISTER_MARKER in proc.stderr


def test_vllm_serve_with_both_platform_plugins_stops_with_one_message(fake_site):
    proc = vllm_serve_help(fake_site)  # VLLM_PLUGINS unset: vLLM would load the fake's `neuron` entry point too
    assert proc.returncode == 1
    assert "Set VLLM_PLUGINS=nki_moe,nki_moe_models" in proc.stderr
    assert "Traceback" not in proc.stderr
