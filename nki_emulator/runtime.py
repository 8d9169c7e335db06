"""Kernel launch: ``nki.jit``, ``kernel[grid]``, ``nki.simulate`` and ``run`` (outputs plus a ``CostReport``).

A launch wraps every array argument as a shared-HBM tensor (a private copy: callers' arrays are never modified),
runs the kernel once per program of the grid (each program gets its own SBUF/PSUM and cost counter, as each runs on
its own NeuronCore), then checks the returned tensors and converts them back to NumPy (or torch, if the arguments
were torch tensors).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
from typing import Any, Callable

import numpy as np

from . import context, dtypes
from .cost import CostReport, build_report
from .errors import NkiEmulatorError, check
from .tensor import MemoryRegion, NkiTensor, Storage


@functools.cache
def _openblas_thread_api():
    """(get, set) of NumPy's bundled OpenBLAS thread count, or None when it cannot be found (then nothing changes)."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "libscipy_openblas*.so*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)  # already loaded by NumPy: dlopen returns the same library
            get, set_ = lib.scipy_openblas_get_num_threads64_, lib.scipy_openblas_set_num_threads64_
        except (OSError, AttributeError):
            continue
        get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
        return get, set_
    return None


@contextlib.contextmanager
def single_threaded_blas():
    """Run NumPy matmuls on one BLAS thread, restoring the previous count after.

    Emulated matmuls are at most [128 x 128] x [128 x 512]: BLAS threads only add hand-off cost, and on a loaded
    machine OpenBLAS's spinning threads make it dramatic (measured on this project's 2-core CI machine at load 5: a
    128^3 fp32 ``np.matmul`` took 30 ms with the default threads and 0.15 ms with one).
    """
    api = _openblas_thread_api()
    if api is None:
        yield
        return
    get, set_ = api
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


class Kernel:
    """A ``@nki.jit`` kernel; ``kernel(*args)`` runs it in the emulator, ``kernel[n](*args)`` with ``n`` programs."""

    def __init__(self, fn: Callable, grid: int = 1, **options: Any):
        self.fn = fn
        self.grid = int(grid)
        self.options = options
        functools.update_wrapper(self, fn)

    def __getitem__(self, grid) -> Kernel:
        if isinstance(grid, tuple):
            check(len(grid) == 1, "kernel[grid]", f"grid={grid}; the emulator supports 1-D grids")
            grid = grid[0]
        check(int(grid) >= 1, "kernel[grid]", f"grid={grid}; must be >= 1")
        return Kernel(self.fn, int(grid), **self.options)

    def __call__(self, *args, **kwargs):
        return run(self, *args, **kwargs)[0]


def jit(fn=None, **kwargs):
    """``@nki.jit`` / ``@nki.jit(...)``: options are accepted and ignored."""
    if fn is None:
        return lambda f: Kernel(f, **kwargs)
    return Kernel(fn, **kwargs)


def simulate(kernel):
    """``nki.simulate(kernel)(*arrays)``: run on CPU, return outputs in the arguments' format."""
    k = kernel if isinstance(kernel, Kernel) else Kernel(kernel)
    return lambda *args, **kwargs: run(k, *args, **kwargs)[0]


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _to_numpy(x: Any) -> np.ndarray:
    if _is_torch(x):
        import torch  # only when the caller passed torch tensors

        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.float().numpy().astype(dtypes.bfloat16)
        return t.numpy()
    return np.asarray(x)


def _to_torch(a: np.ndarray):
    import torch

    if a.dtype == dtypes.bfloat16:
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _wrap_arg(x: Any, i: int, inputs: list[Storage]):
    if isinstance(x, np.ndarray) or _is_torch(x):
        arr = np.array(_to_numpy(x), copy=True)
        dt = dtypes.as_dtype(arr.dtype, f"kernel argument {i}")
        shape = arr.shape if arr.ndim else (1,)
        st = Storage(arr.reshape(-1).astype(dt, copy=False), MemoryRegion.shared_hbm, f"arg{i}", shape)
        st.is_input = True
        inputs.append(st)
        return NkiTensor(shape, dt, st)
    if isinstance(x, (list, tuple)):
        return type(x)(_wrap_arg(v, i, inputs) for v in x)
    return x


def _unwrap(out: Any, torch_out: bool, where: str):
    if isinstance(out, NkiTensor):
        check(
            out.buffer is MemoryRegion.shared_hbm,
            where,
            f"output={out.describe()}; kernel outputs must be allocated in nl.shared_hbm (NKI 0.3+)",
        )
        arr = out.read_raw()
        return _to_torch(arr) if torch_out else arr
    if isinstance(out, (list, tuple)):
        return type(out)(_unwrap(v, torch_out, where) for v in out)
    if isinstance(out, dict):
        return {k: _unwrap(v, torch_out, where) for k, v in out.items()}
    return out


def _returned_storages(out: Any) -> set[int]:
    if isinstance(out, NkiTensor):
        return {id(out._storage)}
    if isinstance(out, (list, tuple)):
        return set().union(*(_returned_storages(v) for v in out)) if out else set()
    if isinstance(out, dict):
        return _returned_storages(list(out.values()))
    return set()


def run(kernel, *args, **kwargs) -> tuple[Any, CostReport]:
    """Run ``kernel`` (an ``@nki.jit`` kernel, ``kernel[n]`` or a plain function) in the emulator.

    Returns ``(outputs, report)``: outputs as the kernel returned them, tensors converted to NumPy arrays (torch
    tensors if any argument was one), and the trn2 ``CostReport`` of the call. For a grid of n programs the programs run
    one after another; the j-th ``nl.shared_hbm`` allocation of each program is the same tensor, so programs that
    each write their share of an output produce the whole output (the last program's return value is returned).
    """
    k = kernel if isinstance(kernel, Kernel) else Kernel(kernel)
    name = getattr(k.fn, "__name__", "kernel")
    where = f"kernel {name}"
    torch_out = any(_is_torch(a) for a in list(args) + list(kwargs.values()))
    inputs: list[Storage] = []
    wargs = [_wrap_arg(a, i, inputs) for i, a in enumerate(args)]
    wkwargs = {key: _wrap_arg(v, key, inputs) for key, v in kwargs.items()}
    counters, peak_sbuf, peak_psum = [], 0, 0
    result = None
    shared: list[Storage] = []
    with single_threaded_blas():  # only around the kernel: the rest of the process keeps its BLAS threads
        for pid in range(k.grid):
            ctx = context.ProgramContext(pid, k.grid, shared)
            prev = context.set_current(ctx)
            try:
                out = k.fn(*wargs, **wkwargs)
                returned = _returned_storages(out)
                for st in inputs:
                    if st.written and id(st) not in returned:
                        raise NkiEmulatorError(
                            f"{where}: input {st.name}{list(st.shape)} was written; kernel arguments are read-only "
                            "unless the kernel also returns them as outputs"
                        )
                result = _unwrap(out, torch_out, where)
                del out
            finally:
                context.set_current(prev)
            counters.append(ctx.cost)
            peak_sbuf = max(peak_sbuf, ctx.memory.peak_sbuf_bytes)
            peak_psum = max(peak_psum, ctx.memory.peak_psum_banks)
    return result, build_report(counters, peak_sbuf, peak_psum)
