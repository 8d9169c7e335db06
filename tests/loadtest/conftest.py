"""Fixtures for the load-test tests: the repository on sys.path, the `server` marker, a fake server, prompt files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# `loadtest` is a top-level folder of the repository, not an installed package; the fake server lives here.
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from fake_openai_server import FakeServer  # noqa: E402


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
