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
import inspect
import os
import threading
import warnings
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


class NkiLanguageWarning(UserWarning):
    """A kernel breaks a language rule of the default NKI release (an error when a release is chosen explicitly)."""


class Kernel:
    """A ``@nki.jit`` kernel; ``kernel(*args)`` runs it in the emulator, ``kernel[n](*args)`` with ``n`` programs."""

    def __init__(self, fn: Callable, grid: int = 1, **options: Any):
        self.fn = fn
        self.grid = int(grid)
        self.options = options
        self._checked: str | None = None  # the NKI version whose language rules this kernel passed
        functools.update_wrapper(self, fn)

    def check_language(self) -> None:
        """Reject Python the selected NKI release's compiler rejects (language_rules), once per kernel and version.

        Under the default release (none chosen explicitly) violations are a ``NkiLanguageWarning`` instead, once per
        kernel, so kernels that still break a rule keep running while they are fixed (docs/emulator.md).
        """
        from . import language_rules
        from .release import ENV_VERSION, nki_version, strict

        version = nki_version()
        if self._checked == version:
            return
        if strict():
            language_rules.enforce(self.fn, version)
        else:
            found = language_rules.check(self.fn, version)
            if found:
                warnings.warn(
                    NkiLanguageWarning(
                        f"kernel {getattr(self.fn, '__name__', 'kernel')}: "
                        + found[0].format(version)
                        + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")
                        + f"; an error once a release is chosen (install(nki_version=...) or ${ENV_VERSION})"
                    ),
                    stacklevel=3,
                )
        self._checked = version

    def __getitem__(self, grid) -> Kernel:
        if isinstance(grid, tuple):
            check(len(grid) == 1, "kernel[grid]", f"grid={grid}; the emulator supports 1-D grids")
            grid = grid[0]
        check(int(grid) >= 1, "kernel[grid]", f"grid={grid}; must be >= 1")
        k = Kernel(self.fn, int(grid), **self.options)
        k._checked = self._checked
        return k

    def __call__(self, *args, **kwargs):
        if context.current().launch is not None:
            # called from a running kernel: inlined into the caller's program, as the compiler inlines calls
            # (nki-language-guide.rst, "Compilation model"); nki-library's moe_cte calls its @nki.jit variants so
            return self.fn(*args, **kwargs)
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
    """A torch tensor, subclasses included (vLLM's weight parameters), recognised without importing torch."""
    return any(c.__module__.startswith("torch") and c.__name__ == "Tensor" for c in type(x).__mro__)


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like as a NumPy array; bfloat16 as ml_dtypes' bfloat16, bit for bit."""
    if _is_torch(x):
        import torch  # only when the caller passed torch tensors

        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:  # bit-exact reinterpretation (no fp32 round trip through 2x the memory)
            return t.contiguous().view(torch.int16).numpy().view(dtypes.bfloat16)
        return t.numpy()
    return np.asarray(x)


def to_torch(a: np.ndarray):
    """A NumPy array as a CPU torch tensor sharing its bytes where it can; ml_dtypes' bfloat16 as torch.bfloat16."""
    import torch

    if a.dtype == dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _wrap_arg(x: Any, i: int, inputs: list[Storage], seen: dict | None = None):
    """A kernel argument as the kernel sees it: arrays and tensors copied into HBM tensors (one tensor passed twice,
    e.g. the same weight in two layers' lists, is one HBM tensor, as on a device), containers element by element."""
    seen = {} if seen is None else seen
    if (isinstance(x, np.ndarray) or _is_torch(x)) and id(x) in seen:
        return seen[id(x)]
    if isinstance(x, np.ndarray) or _is_torch(x):
        arr = np.array(to_numpy(x), copy=True)
        dt = dtypes.as_dtype(arr.dtype, f"kernel argument {i}")
        shape = arr.shape if arr.ndim else (1,)
        st = Storage(arr.reshape(-1).astype(dt, copy=False), MemoryRegion.shared_hbm, f"arg{i}", shape)
        st.is_input = True
        inputs.append(st)
        seen[id(x)] = NkiTensor(shape, dt, st)
        return seen[id(x)]
    if isinstance(x, (list, tuple)):
        return type(x)(_wrap_arg(v, i, inputs, seen) for v in x)
    return x


def _unwrap(out: Any, torch_out: bool, where: str):
    if isinstance(out, NkiTensor):
        check(
            out.buffer is MemoryRegion.shared_hbm,
            where,
            f"output={out.describe()}; kernel outputs must be allocated in nl.shared_hbm (NKI 0.3+)",
        )
        arr = out.read_raw()
        return to_torch(arr) if torch_out else arr
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


def _run_program(k: Kernel, pid: int, launch: context.Launch, wargs, wkwargs, inputs, torch_out, where, results):
    """One program of a launch, in the calling thread; stores (output, cost, memory) or the exception."""
    ctx = context.ProgramContext(pid, k.grid, launch)
    prev = context.set_current(ctx)
    try:
        out = k.fn(*wargs, **wkwargs)
        ctx.memory.finish(where if k.grid == 1 else f"{where} (program {pid})")
        returned = _returned_storages(out)
        for st in inputs:
            if st.written and id(st) not in returned:
                raise NkiEmulatorError(
                    f"{where}: input {st.name}{list(st.shape)} was written; kernel arguments are read-only "
                    "unless the kernel also returns them as outputs"
                )
        results[pid] = (out, ctx)
    except BaseException as e:  # noqa: BLE001 - re-raised by run() in the caller's thread
        results[pid] = e
        launch.abort()
    finally:
        launch.program_done()
        context.set_current(prev)


def _allow_mutable_arguments(fn, wargs, wkwargs) -> None:
    """Arguments annotated ``nt.mutable_tensor`` may be written in place without being returned."""
    from .release import markers

    marker = markers["mutable"]
    ann = getattr(fn, "__annotations__", {}) or {}
    if marker is None or not any(v is marker for v in ann.values()):
        return
    names = list(inspect.signature(fn).parameters)
    for i, a in enumerate(wargs):
        if i < len(names) and ann.get(names[i]) is marker and isinstance(a, NkiTensor):
            a._storage.is_input = False
    for key, a in wkwargs.items():
        if ann.get(key) is marker and isinstance(a, NkiTensor):
            a._storage.is_input = False


def _run_grid(k: Kernel, launch: context.Launch, wargs, wkwargs, inputs, torch_out, where, results) -> None:
    if k.grid == 1:
        _run_program(k, 0, launch, wargs, wkwargs, inputs, torch_out, where, results)
        return
    name = getattr(k.fn, "__name__", "kernel")
    threads = [
        threading.Thread(
            target=_run_program,
            args=(k, pid, launch, wargs, wkwargs, inputs, torch_out, where, results),
            name=f"{name}[program {pid}]",
            daemon=True,
        )
        for pid in range(k.grid)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_ranks(kernel, args_per_rank, kwargs_per_rank=None) -> list[tuple[Any, CostReport]]:
    """``run`` once per rank, concurrently, so that the kernel's ``nki.collectives`` calls meet: rank r gets
    ``args_per_rank[r]`` (and ``kwargs_per_rank[r]``). Returns each rank's ``(outputs, report)`` in rank order."""
    from . import collectives

    return collectives.run_ranks(run, kernel, args_per_rank, kwargs_per_rank)


def run(kernel, *args, **kwargs) -> tuple[Any, CostReport]:
    """Run ``kernel`` (an ``@nki.jit`` kernel, ``kernel[n]`` or a plain function) in the emulator.

    Returns ``(outputs, report)``: outputs as the kernel returned them, tensors converted to NumPy arrays (torch
    tensors if any argument was one), and the trn2 ``CostReport`` of the call. A grid of n programs runs them
    concurrently, one thread each (``core_barrier`` and ``sendrecv`` synchronise them as on hardware); the j-th
    ``nl.shared_hbm`` allocation of each program is the same tensor, so programs that each write their share of an
    output produce the whole output (program 0's return value is returned).
    """
    k = kernel if isinstance(kernel, Kernel) else Kernel(kernel)
    where = f"kernel {getattr(k.fn, '__name__', 'kernel')}"
    k.check_language()
    from . import language_rules
    from .release import nki_version, strict

    if strict():
        language_rules.check_arguments(args, kwargs, nki_version(), where)
    torch_out = any(_is_torch(a) for a in list(args) + list(kwargs.values()))
    inputs: list[Storage] = []
    seen: dict = {}  # id of an argument array -> its HBM tensor (``args`` keeps every array alive meanwhile)
    wargs = [_wrap_arg(a, i, inputs, seen) for i, a in enumerate(args)]
    wkwargs = {key: _wrap_arg(v, key, inputs, seen) for key, v in kwargs.items()}
    _allow_mutable_arguments(k.fn, wargs, wkwargs)
    from . import collectives

    launch = context.Launch(k.grid, *collectives.current_rank())
    results: list[Any] = [None] * k.grid
    with single_threaded_blas():  # only around the kernel: the rest of the process keeps its BLAS threads
        _run_grid(k, launch, wargs, wkwargs, inputs, torch_out, where, results)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        # the first real failure, not a partner's broken barrier caused by it
        real = [e for e in errors if not isinstance(e, context.PartnerFailed)]
        raise (real or errors)[0]
    result = _unwrap(results[0][0], torch_out, where)
    for r in results[1:]:
        _unwrap(r[0], torch_out, where)  # every program's outputs must be in shared HBM
    ctxs = [r[1] for r in results]
    return result, build_report(
        [c.cost for c in ctxs],
        max(c.memory.peak_sbuf_bytes for c in ctxs),
        max(c.memory.peak_psum_banks for c in ctxs),
    )
