"""Fake libtorch-neuronx-lite: importable, nothing more."""
