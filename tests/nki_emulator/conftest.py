"""Emulator tests import kernels with the real NKI import lines: register the emulator as ``nki`` first."""

import nki_emulator as emulator

emulator.install()
