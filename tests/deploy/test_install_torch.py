"""scripts/install-torch.sh picks where torch==2.13.0+cpu comes from, run with the real pip against local indexes.

Each case builds the indexes a user's pip might see as directories (pip reads ``file:`` indexes and find-links the way
it reads remote ones) holding a minimal wheel named as PyTorch names its CPU build; pip's own configuration is
switched off so the machine's wheel directory takes no part.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "install-torch.sh"


def _wheel(directory: Path, version: str) -> Path:
    """A minimal installable wheel ``torch-<version>-py3-none-any.whl`` (what pip needs: METADATA, WHEEL, RECORD)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    files = {
        "torch/__init__.py": f"__version__ = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        zf.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in [*files, f"{info}/RECORD"]))
    return path


def _index(root: Path, *versions: str) -> str:
    """A PEP 503 simple index (``<root>/torch/index.html`` linking each wheel, ``+`` quoted as PyTorch's index quotes
    it) with torch at ``versions``; returns its ``file:`` URL."""
    project = root / "torch"
    project.mkdir(parents=True, exist_ok=True)
    links = []
    for v in versions:
        name = _wheel(project, v).name
        links.append(f'<a href="{quote(name)}">{name}</a>')
    (project / "index.html").write_text(f"<html><body>{''.join(links)}</body></html>\n")
    return root.as_uri()


def _run(tmp_path: Path, *, configured_index: str, find_links: str = "", torch_index: str, args=(), python=None):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
        "PIP_CONFIG_FILE": os.devnull,  # the machine's pip.conf (its wheel directory, its mirrors) takes no part
        "PIP_INDEX_URL": configured_index,
        "PIP_FIND_LINKS": find_links,
        "PIP_NO_CACHE_DIR": "1",
        "VLLM_NKI_MOE_TORCH_INDEX": torch_index,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), python or sys.executable, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_a_local_wheel_directory_with_the_cpu_build_is_used_and_nothing_else(tmp_path):
    wheels = tmp_path / "wheels"
    _wheel(wheels, "2.13.0+cpu")
    run = _run(
        tmp_path,
        configured_index=_index(tmp_path / "pypi"),
        find_links=str(wheels),
        torch_index=(tmp_path / "never-contacted").as_uri(),
        args=("--resolve-only",),
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "torch source: configured"


def test_pypi_s_cuda_build_alone_does_not_count_and_pytorch_s_cpu_index_is_added(tmp_path):
    # A normal machine: the configured index (PyPI) has torch 2.13.0, the CUDA build, without the +cpu local version.
    torch_index = _index(tmp_path / "pytorch-cpu", "2.13.0+cpu")
    run = _run(
        tmp_path,
        configured_index=_index(tmp_path / "pypi", "2.13.0"),
        torch_index=torch_index,
        args=("--resolve-only",),
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"torch source: {torch_index}"


def test_neither_source_is_one_clear_line_and_exit_1(tmp_path):
    run = _run(
        tmp_path,
        configured_index=_index(tmp_path / "pypi", "2.13.0"),
        torch_index=(tmp_path / "unreachable").as_uri(),
        args=("--resolve-only",),
    )
    assert run.returncode == 1
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "torch==2.13.0+cpu" in lines[0] and "VLLM_NKI_MOE_TORCH_INDEX" in lines[0]


def test_installs_the_cpu_build_from_the_pytorch_index_into_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    run = _run(
        tmp_path,
        configured_index=_index(tmp_path / "pypi", "2.13.0"),
        torch_index=_index(tmp_path / "pytorch-cpu", "2.13.0+cpu"),
        python=str(py),
    )
    assert run.returncode == 0, run.stderr
    installed = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('torch'))"], capture_output=True, text=True
    )
    assert installed.stdout.strip() == "2.13.0+cpu"
