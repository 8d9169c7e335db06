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

        ModelRegistry.register_model(
            "FakeUpstreamNeuronForCausalLM", "vllm_neuron.model.fake:FakeUpstreamNeuronForCausalLM"
        )
        CALLS.append(("pre_register_and_update", parser is not None))
        print("fake vllm_neuron: NeuronPlatform.pre_register_and_update", file=sys.stderr)

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        CALLS.append(("check_and_update_config", vllm_config.model_config is not None))
        if vllm_config.model_config is None:
            return
        parallel_config = vllm_config.parallel_config
        if parallel_config.worker_cls == "auto":
            parallel_config.worker_cls = "vllm_neuron.vllm.worker.neuron_worker.NeuronWorker"
