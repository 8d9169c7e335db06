"""A bounded headless run of ``locust -f loadtest/prompts.py`` as a subprocess, for the tests."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "loadtest" / "prompts.py"
LOCUST_RUN_LIMIT = "60s"  # locust's own -t: no test run may go on longer
SUBPROCESS_TIMEOUT_S = 120  # and the process is killed if locust itself hangs


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


def run_locust(
    host: str,
    report_dir: Path,
    *args: str,
    users: int = 1,
    spawn_rate: float = 1,
    run_time: str = LOCUST_RUN_LIMIT,
    timeout_s: float = SUBPROCESS_TIMEOUT_S,
) -> LocustRun:
    """Run ``locust -f loadtest/prompts.py --headless`` against ``host`` (loopback only), bounded in time twice."""
    assert host.startswith(("http://127.", "http://localhost")), f"run_locust: host={host}; loopback only"
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "--report-dir",
        str(report_dir),
        "-u",
        str(users),
        "-r",
        str(spawn_rate),
        "-t",
        run_time,
        "--only-summary",
        "--loglevel",
        "WARNING",
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
    return LocustRun(proc.returncode, proc.stdout + proc.stderr, report_dir)
