"""Our Qwen3-MoE behind vllm-neuron's runner-to-model contract (vllm-neuron 0.24.0.1.1.0, docs/neuron.md section 3.3).

The plugin's own layout (``aws-neuron/aws-neuron-sdk:vllm-neuron/docs/model-dev/onboarding-models.md`` section 1):
``config.py`` (the settings read from the HF config and upstream's ``NeuronConfig``, validated), ``factory.py``
(``from_configs``, what ``NeuronModelRunner.load_model`` calls), ``model.py`` (the runner-facing model composing the
modules of ``vllm_nki_moe.models.qwen3_moe``). Imported only on the Neuron path (the class ``vllm_nki_moe.plugin``
registers there).
"""
