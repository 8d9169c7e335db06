"""``kernels check`` on AWS's nki: on the Neuron device (``--kernels nki``) or AWS's simulator (``--kernels nki-sim``),
and the model given as vLLM names it (``--model``, ``--tensor-parallel-size``).

AWS's ``nki`` is not installable here. Where a test needs it "importable", the name ``nki`` is answered by our
emulator, whose ``simulate`` follows the documented ``nki.simulate(kernel)(*arrays)`` (NumPy in, NumPy out); the
device is the host CPU standing in for ``neuron`` so that the copy to the device and back is exercised.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vllm_nki_moe.ops import kernel_call
from vllm_nki_moe.platforms import devices
from vllm_nki_moe.tools.cli import main
from vllm_nki_moe.tools.kernel_check import runner

ONLY = "router_topk,rms_norm"


@pytest.fixture
def aws_nki_importable(monkeypatch):
    monkeypatch.setattr(kernel_call, "real_nki_available", lambda: True)


def test_nki_without_aws_nki_is_a_clear_error(capsys):
    assert main(["kernels", "check", "--kernels", "nki", "--only", ONLY]) == 2
    err = capsys.readouterr().err
    assert "kernels=nki but AWS's `nki` package is not importable here" in err and "--kernels emulator" in err


def test_nki_sim_without_aws_nki_is_a_clear_error(capsys):
    assert main(["kernels", "check", "--kernels", "nki-sim", "--only", ONLY]) == 2
    assert "kernels=nki-sim but AWS's `nki`" in capsys.readouterr().err


def test_nki_without_a_device_points_at_the_simulator(aws_nki_importable, monkeypatch, capsys):
    monkeypatch.setattr(devices, "find_neuron_devices", lambda: [])
    assert main(["kernels", "check", "--kernels", "nki", "--only", ONLY]) == 2
    err = capsys.readouterr().err
    assert "none is visible" in err and "--kernels nki-sim" in err


def test_nki_sim_runs_each_kernel_through_nki_simulate(aws_nki_importable, capsys):
    assert main(["kernels", "check", "--kernels", "nki-sim", "--only", ONLY, "--tokens", "1,131"]) == 0
    out = capsys.readouterr().out
    assert "kernels=nki-sim" in out and "FAIL" not in out and "8 of 8 passed" in out


def test_nki_copies_inputs_to_the_device_and_outputs_back(aws_nki_importable, monkeypatch, capsys):
    monkeypatch.setattr(devices, "find_neuron_devices", lambda: ["/dev/neuron0"])
    monkeypatch.setattr(runner, "NEURON_TORCH_DEVICE", "cpu")  # the host stands in for the Neuron device
    seen = []
    real_call = kernel_call.call_kernel

    def recording_call(backend, kernel, *args, grid=1):
        seen.append((backend, [type(a).__name__ for a in args], {a.device.type for a in args if torch.is_tensor(a)}))
        return real_call("emulator", kernel, *args, grid=grid)  # torch tensors in, torch tensors out, as on the device

    monkeypatch.setattr(kernel_call, "call_kernel", recording_call)
    assert main(["kernels", "check", "--kernels", "nki", "--only", ONLY, "--tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 passed" in out
    assert len(seen) == 4
    for backend, types, device_types in seen:
        assert backend == "nki" and "ndarray" not in types and device_types == {"cpu"}


def test_bfloat16_crosses_to_the_device_and_back_bit_exactly():
    from nki_emulator import dtypes
    from nki_emulator.runtime import to_torch

    x = np.random.default_rng(0).standard_normal((3, 5)).astype(dtypes.bfloat16)
    t = to_torch(x).to("cpu")
    assert t.dtype == torch.bfloat16 and t.shape == (3, 5)
    back = runner._to_host((t, torch.arange(4)))
    assert back[0].dtype == dtypes.bfloat16 and np.array_equal(back[0].view(np.int16), x.view(np.int16))
    assert back[1].tolist() == [0, 1, 2, 3]


def test_model_directory_and_tensor_parallel_size_as_vllm_names_them(tmp_path, capsys):
    from tests.tools.test_kernel_check import SMALL_CONFIG

    (tmp_path / "config.json").write_text(json.dumps(SMALL_CONFIG))
    argv = ["kernels", "check", "--model", str(tmp_path), "--tensor-parallel-size", "2", "--only", "rms_norm"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'config.json'} TP=2" in out


def test_model_and_config_together_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["kernels", "check", "--model", str(tmp_path), "--config", str(tmp_path / "c.json")])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_model_id_that_cannot_be_fetched_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["kernels", "check", "--model", "no-such-org/no-such-model", "--only", "rms_norm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model='no-such-org/no-such-model'" in err


def test_lnc_2_launches_grid_kernels_on_two_programs_at_half_the_time(capsys):
    from vllm_nki_moe.tools.kernel_check.registry import all_cases
    from vllm_nki_moe.tools.kernel_check.shapes import kernel_shapes

    cases = [c for c in all_cases(kernel_shapes(None, 4), 1, "linear.lm_head") if c.phase == "decode"]
    one, two = runner.run_cases(cases, lnc=1)[0], runner.run_cases(cases, lnc=2)[0]
    assert one.passed and two.passed and two.lnc_grid
    assert two.estimated_seconds < 0.6 * one.estimated_seconds  # each core streams half of the 155 MB
    assert main(["kernels", "check", "--lnc", "2", "--only", "linear", "--tokens", "1"]) == 0
    assert "LNC=2" in capsys.readouterr().out


def test_an_lnc_other_than_1_or_2_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["kernels", "check", "--lnc", "3"])
    assert exc.value.code == 2 and "--lnc: invalid choice: 3" in capsys.readouterr().err


def test_lnc_2_on_trn1_is_a_usage_error_naming_the_target(capsys):
    assert main(["kernels", "check", "--target", "trn1", "--lnc", "2", "--only", "linear"]) == 2
    err = capsys.readouterr().err
    assert "--lnc 2 with --target trn1" in err and "NeuronCore-v2" in err


def test_llama_3_2_1b_decode_step_on_trn1(capsys):
    """The dense decoder's step on trn1 (NeuronCore-v2 table), from the shipped Llama 3.2 1B config."""
    from pathlib import Path

    config = Path(__file__).parents[2] / "benchmarks" / "configs" / "llama-3.2-1b.json"
    assert main(["kernels", "bench", "--config", str(config), "--tp", "1", "--target", "trn1"]) == 0
    out = capsys.readouterr().out
    assert "dense MLP intermediate 8192" in out and "target trn1" in out
    assert "trn1 (NeuronCore-v2), TP=1: one rank per logical core at LNC=1; 2 physical cores per chip" in out
    for batch in (1, 8, 32):
        assert f"decode step, batch {batch}: " in out
    assert "router" not in out and "moe_" not in out  # no experts
    assert "NOT COUNTED" not in out  # every kernel takes the shapes on trn1
