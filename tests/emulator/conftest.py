"""Emulator tests import kernels with the real NKI import lines: register the emulator as ``nki`` first."""

from vllm_nki_moe import emulator

emulator.install()
