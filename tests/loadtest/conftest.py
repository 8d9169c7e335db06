"""Fixtures for the load-test tests: the repository on sys.path, a fake server, and a bounded headless locust run."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# `loadtest` is a top-level folder of the repository, not an installed package; the fake server lives here.
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from fake_openai_server import FakeServer  # noqa: E402

LOCUSTFILE = REPO / "loadtest" / "prompts.py"
LOCUST_RUN_LIMIT = "60s"  # locust's own -t: no test run may go on longer
SUBPROCESS_TIMEOUT_S = 120  # and the process is killed if locust itself hangs


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "server: needs the real tiny CPU vLLM server (tests/conftest.py tiny_server)")


@dataclass
class LocustRun:
    """A finished headless locust run: exit code, output, and the report it wrote (None if it wrote none)."""

    returncode: int
    output: str
    report_dir: Path

    @property
    def report(self) -> dict | None:
        path = self.report_dir / "report.json"
        return json.loads(path.read_text()) if path.exists() else None


def run_locust(host: str, report_dir: Path, *args: str, users: int = 1, spawn_rate: float = 1,
               run_time: str = LOCUST_RUN_LIMIT, timeout_s: float = SUBPROCESS_TIMEOUT_S) -> LocustRun:
    """Run ``locust -f loadtest/prompts.py --headless`` against ``host`` (loopback only), bounded in time twice."""
    assert host.startswith(("http://127.", "http://localhost")), f"run_locust: host={host}; loopback only"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
           "--report-dir", str(report_dir), "-u", str(users), "-r", str(spawn_rate), "-t", run_time,
           "--only-summary", "--loglevel", "WARNING", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    return LocustRun(proc.returncode, proc.stdout + proc.stderr, report_dir)


@pytest.fixture
def fake_server():
    with FakeServer() as server:
        yield server


@pytest.fixture
def prompt_file(tmp_path):
    """Factory: write prompts (separated by blank lines) to a file and return its path."""
    def write(*prompts: str) -> Path:
        path = tmp_path / "prompts.txt"
        path.write_text("\n\n".join(prompts) + "\n", encoding="utf-8")
        return path

    return write
