"""Fixtures shared by the whole suite: tiny checkpoints and a real `vllm serve` on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
VLLM = Path(sys.executable).with_name("vllm")
SERVER_START_TIMEOUT_S = 240  # observed 20-45 s on a 2-core machine; generous for a loaded CI box


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The default tiny Qwen3-MoE checkpoint (what `scripts/serve.sh` serves)."""
    from vllm_nki_moe.tools.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-default"), seed=0)


@pytest.fixture(scope="session")
def make_model(tmp_path_factory):
    """Factory: a tiny checkpoint of ``arch`` with the given config overrides (cached per arguments)."""
    from vllm_nki_moe.tools.tiny_model import make_tiny_model

    cache: dict[str, Path] = {}

    def make(overrides: dict | None = None, seed: int = 0, arch: str = "qwen3_moe", fp8: bool = False) -> Path:
        key = json.dumps([overrides, seed, arch, fp8], sort_keys=True)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}{'-fp8' if fp8 else ''}")
            cache[key] = make_tiny_model(out, overrides, seed=seed, arch=arch, fp8=fp8)
        return cache[key]

    return make


@pytest.fixture
def kernel_launches(monkeypatch):
    """``watch(module)``: from then on, every ``call_kernel`` made through ``module`` (an ops module that imported it)
    appends the kernel's name to the returned list, then runs as before."""

    def watch(module) -> list[str]:
        launched: list[str] = []
        real = module.call_kernel

        def spy(backend, kernel, *args, **kwargs):
            launched.append(getattr(kernel, "__name__", str(kernel)))
            return real(backend, kernel, *args, **kwargs)

        monkeypatch.setattr(module, "call_kernel", spy)
        return launched

    return watch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    model: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_server(model_dir: Path, log_path: Path, *extra: str, env: dict | None = None) -> Server:
    port = free_port()
    name = "tiny-qwen3-moe"
    cmd = [
        str(VLLM),
        "serve",
        str(model_dir),
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "8",
        *extra,
    ]
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    server = Server(url=f"http://127.0.0.1:{port}", model=name, process=proc, log_path=log_path)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(1)
    stop_server(server)
    raise RuntimeError(f"vllm serve not healthy after {SERVER_START_TIMEOUT_S} s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, 15)
        try:
            server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, 9)
            server.process.wait()


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """A real `vllm serve` of the default tiny model through this plugin, on a free loopback port."""
    if not VLLM.exists() and not shutil.which("vllm"):
        pytest.skip("vLLM is not installed in this environment")
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("server") / "vllm-serve.log")
    yield server
    stop_server(server)


_DISPATCH_LEAKED_BY: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """A test that leaves torch's Python dispatch key excluded (a no_dispatch() or dispatch-mode guard not undone)
    fails here, by name: every later torch.compile / opcheck in the process would otherwise fail with torch's
    "you set no_dispatch() before calling into this function" (seen once in a full run, not reproduced since)."""
    yield
    torch = sys.modules.get("torch")
    if not _DISPATCH_LEAKED_BY and torch is not None:
        if torch._C._dispatch_tls_local_exclude_set().has(torch._C.DispatchKey.Python):
            _DISPATCH_LEAKED_BY.append(item.nodeid)  # reported once: every later test would see the same state
            pytest.fail(f"{item.nodeid} left torch's Python dispatch key excluded (an unclosed no_dispatch() or mode)")
