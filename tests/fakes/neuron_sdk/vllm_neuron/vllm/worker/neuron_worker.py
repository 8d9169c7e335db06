"""Fake vllm_neuron.vllm.worker.neuron_worker: only what NeuronWorker.__init__ does to the model registry.

vllm-neuron's ``NeuronWorker.__init__`` (jinhuang12/vllm-neuron@03bd80a, ``vllm_neuron/vllm/worker/neuron_worker.py``,
the import of the 0.24 release branch) calls ``WorkerBase.__init__`` and then, in every worker process, registers
each ``(arch, model_cls)`` of ``vllm_neuron.model.registry.get_models()`` with ``ModelRegistry.register_model``, while
a ``logging.Filter`` on ``vllm.model_executor.models.registry`` hides vLLM's "Model architecture ... is already
registered, and will be overwritten" warning. Device set-up, the runner and everything else are not modelled.
"""

import logging
import re

from vllm.v1.worker.worker_base import WorkerBase

CONSTRUCTED = []  # one entry per NeuronWorker built (the tests read it)


class _SuppressModelRegistryOverwrite(logging.Filter):
    _PATTERN = re.compile(r"Model architecture \w+ is already registered.*will be overwritten")

    def filter(self, record):
        return not self._PATTERN.search(record.getMessage())


class NeuronWorker(WorkerBase):
    def __init__(self, vllm_config=None, local_rank=0, rank=0, distributed_init_method=None, is_driver_worker=True):
        super().__init__(
            vllm_config=vllm_config,
            local_rank=local_rank,
            rank=rank,
            distributed_init_method=distributed_init_method,
            is_driver_worker=is_driver_worker,
        )
        from vllm import ModelRegistry

        from vllm_neuron.model import registry

        registry_logger = logging.getLogger("vllm.model_executor.models.registry")
        quiet = _SuppressModelRegistryOverwrite()
        registry_logger.addFilter(quiet)
        try:
            for arch, model_cls in registry.get_models():
                ModelRegistry.register_model(arch, model_cls)
        finally:
            registry_logger.removeFilter(quiet)
        CONSTRUCTED.append(type(self).__name__)
