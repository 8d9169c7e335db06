"""``from_configs``: how vllm-neuron's runner builds our models (the plugin's factory step, guide section 1c).

``NeuronModelRunner.load_model()`` (``jinhuang12/vllm-neuron:vllm_neuron/vllm/worker/neuron_model_runner.py``)
resolves the architecture with ``ModelRegistry.resolve_model_cls``, then, under ``torch.device("meta")``, calls
``model_cls.from_configs(hf_config, neuron_config)`` (text models, positional) or
``from_configs(hf_config=..., text_neuron_config=..., vision_neuron_config=...)`` (when a vision config is set), then
``load_weights(model_path, device, download_dir)`` and ``model.to(device)``. On our Neuron platform the class the
registry resolves is our runner-contract class for the architecture (``NeuronQwen3MoeForCausalLM``,
``NeuronQwen3ForCausalLM``, ``NeuronLlamaForCausalLM``; ``vllm_nki_moe.plugin.register_models``, in every process),
and its ``from_configs`` classmethod lands here.
"""

from __future__ import annotations

from vllm_nki_moe.models.neuron_runner.config import WHERE, NeuronRunnerConfig


def from_configs(model_cls, hf_config, neuron_config=None, *, text_neuron_config=None, vision_neuron_config=None):
    """Validate the configuration for ``model_cls.architecture`` and build ``model_cls`` (a class of ``model``, whose
    ``from_configs`` classmethod calls this).

    Reads the current ``VllmConfig`` (set by vLLM's worker around model loading) for the dtype, the cache dtype and
    the layers' construction, and vLLM's tensor-parallel group for the TP degree. Parameters are created on the
    current default device (``meta`` under the runner); ``load_weights`` materialises them.
    """
    from vllm.config import get_current_vllm_config, set_current_vllm_config
    from vllm.distributed import get_tensor_model_parallel_world_size
    from vllm.utils.torch_utils import set_default_torch_dtype

    where = WHERE.format(model_cls.architecture)
    if vision_neuron_config is not None:
        raise NotImplementedError(f"{where}: vision_neuron_config is set; {model_cls.architecture} is a text model")
    if neuron_config is None:
        neuron_config = text_neuron_config
    try:
        vllm_config = get_current_vllm_config()  # newer vLLM asserts when unset, older ones return a default
    except AssertionError:
        vllm_config = None
    if vllm_config is None or vllm_config.model_config is None:
        raise RuntimeError(f"{where}: from_configs needs vLLM's current config (set_current_vllm_config); none is set")
    config = NeuronRunnerConfig.from_configs(
        hf_config,
        neuron_config,
        tp_size=get_tensor_model_parallel_world_size(),
        dtype=vllm_config.model_config.dtype,
        cache_dtype=getattr(vllm_config.cache_config, "cache_dtype", "auto"),
        architecture=model_cls.architecture,
    )
    with set_current_vllm_config(vllm_config), set_default_torch_dtype(config.dtype):
        return model_cls(vllm_config=vllm_config, config=config)
