"""Platform plugin decisions (which platform activates where) and the --device flag, without starting vLLM."""

from __future__ import annotations

import argparse

import pytest

from vllm_nki_moe import platforms as plugin_platform
from vllm_nki_moe.envs import DEVICE_ENV
from vllm_nki_moe.platforms.device_flag import add_device_flag


@pytest.fixture
def no_neuron(monkeypatch):
    monkeypatch.setattr(plugin_platform.devices, "find_neuron_devices", lambda: [])
    monkeypatch.delenv(DEVICE_ENV, raising=False)


def test_activates_on_a_vllm_cpu_build(no_neuron, monkeypatch):
    monkeypatch.setattr(plugin_platform, "_on_vllm_cpu_build", lambda: True)
    assert plugin_platform.register_platform() == plugin_platform.CPU_PLATFORM


def test_leaves_a_gpu_build_of_vllm_alone(no_neuron, monkeypatch):
    monkeypatch.setattr(plugin_platform, "_on_vllm_cpu_build", lambda: False)
    assert plugin_platform.register_platform() is None


def test_env_forces_cpu_even_on_other_builds(no_neuron, monkeypatch):
    monkeypatch.setattr(plugin_platform, "_on_vllm_cpu_build", lambda: False)
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert plugin_platform.register_platform() == plugin_platform.CPU_PLATFORM


def test_bad_device_env_is_rejected(no_neuron, monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "gpu")
    with pytest.raises(ValueError, match="VLLM_NKI_MOE_DEVICE='gpu'; must be one of auto, cpu, neuron"):
        plugin_platform.register_platform()


def test_the_installed_platform_class_resolves_and_keeps_the_cpu_enum():
    from vllm.platforms import PlatformEnum
    from vllm.utils.import_utils import resolve_obj_by_qualname

    cls = resolve_obj_by_qualname(plugin_platform.CPU_PLATFORM)
    assert cls._enum == PlatformEnum.CPU  # vLLM's CPU worker relies on it (research/cpu-setup.md trap 8)
    assert cls.device_type == "cpu"


def parser_with_device_flag() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm serve", exit_on_error=False)
    # vLLM's own options that made a bare `--device` ambiguous by prefix matching.
    parser.add_argument("--device-ids")
    parser.add_argument("--device-memory-utilization")
    add_device_flag(parser, serving_device="cpu")
    add_device_flag(parser, serving_device="cpu")  # vLLM calls the hook more than once
    return parser


def test_device_flag_parses_cpu_and_auto():
    parser = parser_with_device_flag()
    assert parser.parse_args(["--device", "cpu"]).device == "cpu"
    assert parser.parse_args([]).device == "auto"


def test_device_neuron_on_cpu_names_where_it_looked(no_neuron, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser_with_device_flag().parse_args(["--device", "neuron"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no Neuron device found" in err and "/dev/neuron*" in err


@pytest.mark.parametrize(
    "additional, expected",
    [(None, None), ({}, None), ({"nki_moe": {}}, None), ({"nki_moe": {"kernels": "emulator"}}, "emulator")],
)
def test_additional_config_kernels_is_read(additional, expected):
    from vllm_nki_moe import envs

    assert envs.configured_kernels(additional) == expected


@pytest.mark.parametrize(
    "section, message",
    [
        ("emulator", "additional_config.nki_moe='emulator'; must be a JSON object"),
        ({"kernel": "nki"}, "additional_config.nki_moe keys ['kernel']; allowed: kernels"),
        ({"kernels": "cuda"}, "additional_config.nki_moe.kernels='cuda'; must be one of auto, torch, emulator, nki"),
    ],
)
def test_bad_additional_config_is_a_clear_error(section, message):
    from vllm_nki_moe import envs

    with pytest.raises(ValueError) as err:
        envs.configured_kernels({"nki_moe": section})
    assert str(err.value) == message
