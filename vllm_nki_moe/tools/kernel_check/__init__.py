"""``vllm-nki-moe kernels check|bench``: every NKI kernel at a model's per-rank shapes, against its reference.

- ``shapes``: per-rank kernel shapes from a Hugging Face Qwen3-MoE config and a TP degree;
- ``tolerances``: the one per-dtype tolerance table (kernel tests use it too);
- ``registry``: ``KernelCase`` (the case interface, documented there) and discovery of ``cases_<family>`` modules;
- ``runner``: runs cases in the emulator or on the real ``nki``, compares, costs; ``CheckRow`` and the table;
- ``bench``: the cost-model table of a Qwen3-30B-A3B decode step and prefill, per kernel, per layer, tokens/s.
"""
