"""`vllm serve` through the plugin fails fast, with a message that names the problem, on bad start-up settings."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import VLLM, free_port

pytestmark = pytest.mark.server


def serve(model_dir, *args: str, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [str(VLLM), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(free_port()), *args]
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.mark.skipif(bool(__import__("glob").glob("/dev/neuron*")), reason="this host has Neuron devices")
def test_device_neuron_without_a_device_fails_fast_naming_where_it_looked(tiny_model_dir):
    proc = serve(tiny_model_dir, "--device", "neuron", timeout=60)  # fails at argument parsing, before the engine
    assert proc.returncode == 2
    assert "no Neuron device found" in proc.stderr
    assert "/dev/neuron*" in proc.stderr


def test_unknown_device_value_is_rejected(tiny_model_dir):
    proc = serve(tiny_model_dir, "--device", "tpu", timeout=60)
    assert proc.returncode == 2
    assert "--device" in proc.stderr and "invalid choice" in proc.stderr


def test_unknown_kernel_backend_is_a_startup_error(tiny_model_dir):
    proc = serve(tiny_model_dir, "--device", "cpu", env={"VLLM_NKI_MOE_KERNELS": "cuda"}, timeout=60)
    assert proc.returncode == 2  # an argument error, before any engine process starts
    assert "VLLM_NKI_MOE_KERNELS='cuda'; must be one of" in proc.stderr
