"""The worker our Neuron platform configures: vllm-neuron's ``NeuronWorker`` that keeps our models registered.

vllm-neuron's ``NeuronWorker.__init__`` registers every model of ``vllm_neuron.model.registry.get_models()`` again
in each worker process, after the plugins ran and with vLLM's overwrite warning filtered out (jinhuang12/vllm-neuron
@03bd80a, ``vllm_neuron/vllm/worker/neuron_worker.py``; upstream's comment: vLLM's registry would otherwise overwrite
its models). Its registry lists its own Llama and Qwen3, and it ships a Qwen3-MoE (vllm-project/vllm-neuron
``vllm_neuron/model/qwen3_moe/``) that a release may list; the workers would then build upstream's class while our
start-up validation checked ours. The subclass
here registers ours again at the end of ``__init__``, the last registration before the worker loads its model
(``init_device`` builds the runner, ``load_model`` resolves the architecture). Its class is built on first access
(module ``__getattr__``), so importing this module imports nothing of the SDK.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

UPSTREAM_WORKER = "vllm_neuron.vllm.worker.neuron_worker.NeuronWorker"
OUR_WORKER = "vllm_nki_moe.platforms.neuron_worker.NkiMoeNeuronWorker"

_built: dict[str, type] = {}


def registered_class(architecture: str) -> str | None:
    """``"module:Class"`` vLLM's registry holds for ``architecture`` (registered lazily by name, or as a class)."""
    from vllm import ModelRegistry

    held = ModelRegistry.models.get(architecture)
    if held is None:
        return None
    cls = getattr(held, "model_cls", None)
    if cls is not None:
        return f"{cls.__module__}:{cls.__qualname__}"
    return f"{held.module_name}:{held.class_name}"


def _reclaim_architectures() -> None:
    """Register our classes again, saying so for each architecture where upstream had put another class."""
    from vllm_nki_moe import plugin

    ours = set(plugin.NEURON_MODEL_CLASSES.values()) | set(plugin.MODEL_CLASSES.values())
    for architecture in plugin.NEURON_MODEL_CLASSES:
        where = registered_class(architecture)
        if where is not None and where not in ours:
            logger.info(
                "vllm_nki_moe: vllm-neuron registered %s for %s in this worker; ours serves it", where, architecture
            )
    plugin.register_models()


def _build_worker_class() -> type:
    from vllm.utils.import_utils import resolve_obj_by_qualname

    base = resolve_obj_by_qualname(UPSTREAM_WORKER)

    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        _reclaim_architectures()

    return type("NkiMoeNeuronWorker", (base,), {"__init__": __init__, "__module__": __name__, "__doc__": __doc__})


def __getattr__(name: str):
    if name == "NkiMoeNeuronWorker":
        if name not in _built:
            _built[name] = _build_worker_class()
        return _built[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
