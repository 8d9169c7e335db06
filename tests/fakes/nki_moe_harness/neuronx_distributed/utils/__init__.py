"""Fake neuronx_distributed.utils: cpu_mode() as the harness uses it; tests flip CPU_MODE."""

CPU_MODE = [False]


def cpu_mode():
    return CPU_MODE[0]
