"""Fakes of the Neuron software we touch, written as real files into a directory that a test puts on ``sys.path``.

Shaped like the interfaces ``vllm_nki_moe.platform_neuron`` documents (vllm-neuron 0.24.0.1.1.0, Neuron SDK 2.32.0):
same module paths, class and function names, signatures; only what we call exists. Also fakes of the nki-moe
harness's imports for the contest drop-in (``neuronx_distributed.utils.cpu_mode`` and NxDI's Qwen3-MoE module).

Nothing here is imported at collection time: :class:`FakeInstall` puts the directory on ``sys.path`` inside one test
and removes every module loaded from it afterwards.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

# The fake vllm_neuron's stand-in for /dev/neuron* (the real register() globs the device files).
FAKE_DEVICES_ENV = "FAKE_NEURON_DEVICES"
PRE_REGISTER_MARKER = "fake vllm_neuron: NeuronPlatform.pre_register_and_update"
UPSTREAM_ARCH = "FakeUpstreamNeuronForCausalLM"  # stands for the architectures upstream registers (Glm5Next...)

SDK_FILES = {
    # vllm_neuron/__init__.py: import-time backend init, then register() -> platform qualname | None.
    "vllm_neuron/__init__.py": f'''
"""Fake vllm-neuron 0.24.0.1.1.0: the package entry point ``register`` and its import-time backend init."""
import glob
import os

INIT_CALLS = []


def _init_backend():
    import libtorch_neuronx_lite  # noqa: F401  (the real one names torch's privateuse1 device "neuron")

    INIT_CALLS.append("init_backend")


def _is_neuron_dev():
    return bool(glob.glob("/dev/neuron*")) or os.environ.get("{FAKE_DEVICES_ENV}") == "1"


def _is_cpu_mode():
    return os.environ.get("VLLM_NEURON_CPU_MODE", "0") == "1"


def _is_cpu_compile():
    return os.environ.get("VLLM_NEURON_CPU_COMPILE", "0") == "1"


def register():
    if not _is_cpu_mode() and not _is_cpu_compile() and not _is_neuron_dev():
        return None
    from vllm_neuron.backend import get_platform_class
    from vllm_neuron.vllm.platform import _patch_dcp_config_validation

    _patch_dcp_config_validation()
    return get_platform_class()


_init_backend()
''',
    "vllm_neuron/backend.py": """
def get_platform_class() -> str:
    return "vllm_neuron.vllm.platform.NeuronPlatform"
""",
    "vllm_neuron/vllm/__init__.py": "",
    "vllm_neuron/vllm/platform.py": f'''
"""Fake vllm_neuron.vllm.platform: NeuronPlatform with the two hooks vllm_nki_moe extends, recording calls."""
import os
import sys

from vllm.platforms import Platform, PlatformEnum

CALLS = []
_CPU_MODE = os.environ.get("VLLM_NEURON_CPU_MODE", "0") == "1"


def _patch_dcp_config_validation():
    CALLS.append(("patch_dcp",))


class NeuronPlatform(Platform):
    _enum = PlatformEnum.OOT
    device_name: str = "cpu" if _CPU_MODE else "neuron"
    device_type: str = "cpu" if _CPU_MODE else "neuron"
    ray_device_key: str = "neuron_cores"
    device_control_env_var: str = "NEURON_VISIBLE_DEVICES"

    @classmethod
    def pre_register_and_update(cls, parser=None) -> None:
        from vllm.model_executor.models.registry import ModelRegistry

        ModelRegistry.register_model("{UPSTREAM_ARCH}", "vllm_neuron.model.fake:{UPSTREAM_ARCH}")
        CALLS.append(("pre_register_and_update", parser is not None))
        print("{PRE_REGISTER_MARKER}", file=sys.stderr)

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        CALLS.append(("check_and_update_config", vllm_config.model_config is not None))
        if vllm_config.model_config is None:
            return
        parallel_config = vllm_config.parallel_config
        if parallel_config.worker_cls == "auto":
            parallel_config.worker_cls = "vllm_neuron.vllm.worker.neuron_worker.NeuronWorker"
''',
    # The runner-to-model contract's types (vllm_neuron/model/kv_cache.py, neuron_config.py): the fields our model
    # reads and the runner's NeuronConfig.from_dict rule for on_device_sampling_config (absent = on, None = off).
    "vllm_neuron/model/__init__.py": "",
    "vllm_neuron/model/kv_cache.py": """
from dataclasses import dataclass

import torch


@dataclass
class LayerSpec:
    name: str
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    sliding_window_size: int | None = None
    chunk_size: int | None = None


@dataclass
class KVSpec:
    layers: list[LayerSpec]
""",
    "vllm_neuron/model/neuron_config.py": """
from dataclasses import dataclass, field


class OnDeviceSamplingConfig:
    def __init__(self, **kwargs):
        self.all_greedy = bool(kwargs.pop("all_greedy", False))
        self.max_top_k = int(kwargs.pop("max_top_k", 256))


@dataclass
class NeuronConfig:
    ep_degree: int = 1
    attention_dp_size: int = 1
    embedding_dp_size: int = 1
    lm_head_dp_size: int = 1
    mlp_dp_size: int = 1
    on_device_sampling_config: OnDeviceSamplingConfig | None = field(default_factory=OnDeviceSamplingConfig)
    max_logprobs: int = 0
    debug_logits_dir: str | None = None
    quantization: str | None = None
    fp8_packed_kv: bool = False
    num_batched_tokens_buckets: list[int] | None = None
    num_seqs_buckets: list[int] | None = None
    kv_segment_size_buckets: list[int] | None = None

    @classmethod
    def from_dict(cls, config_dict: dict) -> "NeuronConfig":
        config_dict = dict(config_dict)
        if "on_device_sampling_config" in config_dict:
            ods = config_dict.pop("on_device_sampling_config")
            config_dict["on_device_sampling_config"] = None if ods is None else OnDeviceSamplingConfig(**ods)
        return cls(**config_dict)
""",
    "libtorch_neuronx_lite/__init__.py": '"""Fake libtorch-neuronx-lite: importable, nothing more."""\n',
    "neuronxcc/__init__.py": '"""Fake neuronx-cc: installed, never imported by vllm_nki_moe."""\n',
    # Found by the SDK check; importing it fails, as the NKI emulator's real-package probe then expects.
    "nki/__init__.py": 'raise ImportError("fake nki: on sys.path for the SDK check only")\n',
    # Upstream's distribution with its platform entry point (pyproject.toml: neuron = "vllm_neuron:register").
    "vllm_neuron-0.24.0.1.1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: vllm-neuron\nVersion: 0.24.0.1.1.0\n",
    "vllm_neuron-0.24.0.1.1.0.dist-info/entry_points.txt": "[vllm.platform_plugins]\nneuron = vllm_neuron:register\n",
    "vllm_neuron-0.24.0.1.1.0.dist-info/RECORD": "",
    # The runtime library aws-neuronx-runtime-lib installs (an empty file: only its name is checked).
    "runtime/libnrt.so.1": "",
}

HARNESS_FILES = {
    "neuronx_distributed/__init__.py": "",
    "neuronx_distributed/utils/__init__.py": '''
"""Fake neuronx_distributed.utils: cpu_mode() as the harness uses it; tests flip CPU_MODE."""
CPU_MODE = [False]


def cpu_mode():
    return CPU_MODE[0]
''',
    "neuronx_distributed_inference/__init__.py": "",
    "neuronx_distributed_inference/models/__init__.py": "",
    "neuronx_distributed_inference/models/qwen3_moe/__init__.py": "",
    # NxDI's modeling_qwen3_moe: the names the drop-in uses, with the structure it relies on (module attributes
    # input_layernorm, post_attention_layernorm, self_attn.q_layernorm/k_layernorm, norm; init_model; _model_cls).
    "neuronx_distributed_inference/models/qwen3_moe/modeling_qwen3_moe.py": '''
"""Fake NxDI Qwen3-MoE model module (src/neuronx_distributed_inference/models/qwen3_moe/modeling_qwen3_moe.py)."""
import torch
from torch import nn
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

from neuronx_distributed.utils import cpu_mode


class CustomRMSNorm(nn.Module):
    def __init__(self, hidden_size=None, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps


def get_rmsnorm_cls():
    return Qwen3MoeRMSNorm if cpu_mode() else CustomRMSNorm


class MoENeuronConfig:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class Qwen3MoeInferenceConfig:
    def __init__(self, neuron_config, load_config=None, **kwargs):
        self.neuron_config = neuron_config
        self.__dict__.update(kwargs)

    @classmethod
    def get_neuron_config_cls(cls):
        return MoENeuronConfig


class NeuronQwen3MoEAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.head_dim = config.head_dim
        self.q_layernorm = get_rmsnorm_cls()(config.head_dim, config.rms_norm_eps)
        self.k_layernorm = get_rmsnorm_cls()(config.head_dim, config.rms_norm_eps)


class NeuronQwen3MoeDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = NeuronQwen3MoEAttention(config)
        self.moe_fused_nki_kernel_enabled = getattr(config, "moe_fused_nki_kernel_enabled", False)
        self.input_layernorm = get_rmsnorm_cls()(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = get_rmsnorm_cls()(config.hidden_size, eps=config.rms_norm_eps)


class NeuronBaseModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.setup_attr_for_model(config)
        self.init_model(config)


class NeuronQwen3MoeModel(NeuronBaseModel):
    def setup_attr_for_model(self, config):
        self.hidden_size = config.hidden_size

    def init_model(self, config):
        self.layers = nn.ModuleList(
            [NeuronQwen3MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = get_rmsnorm_cls()(self.hidden_size, eps=config.rms_norm_eps)


class NeuronBaseForCausalLM:
    _model_cls = None

    def __init__(self, model_path, config=None):
        self.model_path = model_path
        self.config = config

    @classmethod
    def get_config_cls(cls):
        raise NotImplementedError

    @classmethod
    def get_neuron_config_cls(cls):
        return cls.get_config_cls().get_neuron_config_cls()

    def build_model(self):  # stands in for NxDI building _model_cls inside compile()/load()
        return self._model_cls(self.config)

    def compile(self, compiled_model_path, debug=False):
        self.compiled = (compiled_model_path, debug)

    def load(self, compiled_model_path):
        self.loaded = compiled_model_path


class NeuronQwen3MoeForCausalLM(NeuronBaseForCausalLM):
    _model_cls = NeuronQwen3MoeModel

    @classmethod
    def get_config_cls(cls):
        return Qwen3MoeInferenceConfig
''',
}


class FakeInstall:
    """Write ``files`` under ``root``, put ``root`` first on ``sys.path``; ``remove()`` undoes it, modules included."""

    def __init__(self, root: Path, files: dict[str, str]):
        self.root = root
        for rel, text in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text.lstrip("\n"))
        sys.path.insert(0, str(root))
        importlib.invalidate_caches()

    def remove_file(self, rel: str) -> None:
        path = self.root / rel
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()
        importlib.invalidate_caches()

    def loaded_modules(self) -> list[str]:
        root = str(self.root)
        return [
            name
            for name, module in list(sys.modules.items())
            if module is not None and str(getattr(module, "__file__", None) or "").startswith(root)
        ]

    def remove(self) -> None:
        for name in self.loaded_modules():
            del sys.modules[name]
        while str(self.root) in sys.path:
            sys.path.remove(str(self.root))
        importlib.invalidate_caches()
