"""Run kernel cases in the emulator (or on the real ``nki``), compare with their references, cost them.

Each case gives one ``CheckRow``. A case that is unsupported at its shapes, or whose kernel raises (a ``require``
limit, an emulator rule), becomes a failing row carrying the reason, never a crash of the whole check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from nki_emulator import targets
from nki_emulator.runtime import to_numpy, to_torch
from vllm_nki_moe.kernels.limits import PE_COLS, PE_ROWS
from vllm_nki_moe.tools.kernel_check.registry import KernelCase
from vllm_nki_moe.tools.kernel_check.tolerances import compare, tolerance_for

SEED = 0  # inputs of every case come from numpy.random.default_rng(SEED)


@dataclass(frozen=True)
class CheckRow:
    kernel: str
    shapes: str
    max_abs_err: float
    max_rel_err: float
    tolerance: str  # "key (atol, rtol)"
    passed: bool
    estimated_seconds: float | None  # emulator cost model; None on real nki or when the kernel did not run
    roofline_seconds: float  # the larger of min_hbm_bytes at HBM bandwidth and min_macs at Tensor Engine peak
    bound: str = "hbm"  # which of the two sets roofline_seconds
    reason: str = ""  # why it failed or is unsupported
    wall_seconds: float = 0.0  # host time of the emulator run (not a kernel time)
    calls_per_layer: int = 1
    calls_per_step: int = 0
    lnc_grid: bool = False
    phase: str = "any"
    oldest_nki: str | None = None  # the oldest NKI release whose language rules the kernel's source passes
    engine_bound_seconds: float | None = None  # the busiest engine's work: the estimate with perfect overlap
    covers: tuple[str, ...] = ()  # KernelCase.covers

    @property
    def roofline_pct(self) -> float | None:
        if not self.estimated_seconds:
            return None
        return 100.0 * self.roofline_seconds / self.estimated_seconds


def _roofline(case: KernelCase, programs: int) -> dict:
    """The case's roofline on ``programs`` cores: HBM time for its bytes or Tensor Engine time for its MACs (at the
    bf16 peak, 128 x 128 MACs per cycle; emulator/cost.py cites the source), whichever is longer."""
    target = targets.current()
    hbm = case.min_hbm_bytes / (target.hbm_bytes_per_s_per_core * programs)
    pe = case.min_macs / (PE_ROWS * PE_COLS * target.tensor_hz * programs)
    return {"roofline_seconds": max(hbm, pe), "bound": "pe" if pe > hbm else "hbm"}


def oldest_nki_release(kernel) -> str | None:
    """The oldest NKI release whose language rules (the emulator's table, docs/emulator.md) the kernel's source and
    the helpers it calls pass, or None when no release does."""
    from nki_emulator import language_rules

    return language_rules.oldest_release(kernel)


# vLLM Neuron's platform names its torch device "neuron" (NeuronPlatform.device_type, docs/neuron.md section 3.2).
NEURON_TORCH_DEVICE = "neuron"


def _to_host(x):
    """Kernel outputs (a tensor or a tuple of them) back as NumPy arrays on the host, bfloat16 bit-exact."""
    if isinstance(x, (tuple, list)):
        return type(x)(_to_host(v) for v in x)
    return to_numpy(x) if hasattr(x, "detach") else x


def _run_kernel(case: KernelCase, inputs: tuple, backend: str, lnc: int = 1):
    """(outputs as NumPy arrays, emulator report or None) of one case under ``backend``.

    ``emulator``: our emulator, with its cost report. ``nki-sim``: AWS's ``nki.simulate(kernel)(*arrays)`` (NumPy in,
    NumPy out; nki/api/generated/nki.simulate, Neuron 2.32). ``nki``: the inputs are copied to the Neuron device as
    torch tensors, the kernel runs there as the serving path calls it (``ops.kernel_call``), outputs come back.
    """
    # a kernel written for a grid runs one program per physical core of the logical core (nki.simulate(kernel[2]))
    grid = lnc if case.lnc_grid else 1
    kernel = case.kernel_fn[grid] if grid > 1 else case.kernel_fn
    if backend == "emulator":
        from nki_emulator import run, solo_rank

        if case.ranks > 1:  # its collectives cost over case.ranks ranks; the values are this rank's alone
            with solo_rank(case.ranks):
                return run(kernel, *inputs)
        return run(kernel, *inputs)
    if case.ranks > 1:
        raise ValueError(
            f"its collectives span {case.ranks} ranks; only the emulator runs them from one process (solo_rank)"
        )
    if backend == "nki-sim":
        import nki

        return nki.simulate(kernel)(*inputs), None
    if backend == "nki":
        from vllm_nki_moe.ops.kernel_call import call_kernel

        on_device = tuple(to_torch(x).to(NEURON_TORCH_DEVICE) if isinstance(x, np.ndarray) else x for x in inputs)
        return _to_host(call_kernel("nki", case.kernel_fn, *on_device, grid=grid)), None
    raise ValueError(f"kernel_check: kernels={backend!r}; must be emulator, nki or nki-sim")


def run_case(case: KernelCase, backend: str = "emulator", seed: int = SEED, lnc: int = 1) -> CheckRow:
    tol = tolerance_for(case.tolerance)
    tol_text = f"{case.tolerance} ({tol.atol:g}, {tol.rtol:g})"
    common = dict(
        kernel=case.kernel,
        shapes=case.shapes,
        tolerance=tol_text,
        calls_per_layer=case.calls_per_layer,
        calls_per_step=case.calls_per_step,
        lnc_grid=case.lnc_grid,
        phase=case.phase,
        oldest_nki=oldest_nki_release(case.kernel_fn),
        covers=case.covers,
    )
    nan = float("nan")
    if case.unsupported:
        return CheckRow(
            max_abs_err=nan,
            max_rel_err=nan,
            passed=False,
            estimated_seconds=None,
            **_roofline(case, programs=1),
            reason=f"unsupported: {case.unsupported}",
            **common,
        )
    inputs = case.build_inputs(np.random.default_rng(seed))
    start = time.perf_counter()
    try:
        out, report = _run_kernel(case, inputs, backend, lnc)
    except Exception as err:  # noqa: BLE001 - any kernel failure becomes a failing row with its message
        return CheckRow(
            max_abs_err=nan,
            max_rel_err=nan,
            passed=False,
            estimated_seconds=None,
            **_roofline(case, programs=1),
            reason=f"{type(err).__name__}: {err}",
            wall_seconds=time.perf_counter() - start,
            **common,
        )
    wall = time.perf_counter() - start
    grid = lnc if case.lnc_grid else 1
    ref = case.reference(*inputs, grid=grid) if case.reference_grid else case.reference(*inputs)
    cmp = compare(out, ref, tol)
    programs = report.num_programs if report is not None else 1
    return CheckRow(
        max_abs_err=cmp.max_abs_err,
        max_rel_err=cmp.max_rel_err,
        passed=cmp.passed,
        estimated_seconds=report.estimated_seconds if report is not None else None,
        engine_bound_seconds=report.engine_bound_seconds if report is not None else None,
        **_roofline(case, programs),
        reason=cmp.detail,
        wall_seconds=wall,
        **common,
    )


def run_cases(cases: list[KernelCase], backend: str = "emulator", seed: int = SEED, lnc: int = 1) -> list[CheckRow]:
    return [run_case(c, backend, seed, lnc) for c in cases]


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.2f}"


def format_rows(rows: list[CheckRow]) -> str:
    """The check table; failing rows are followed by their reason."""
    header = (
        f"{'kernel':<22} {'shapes':<40} {'max abs err':>11} {'max rel err':>11} {'tolerance':<26} {'pass':<4} "
        f"{'est us':>9} {'roof us':>9} {'% roof':>6} {'bound':<5} {'nki >=':<6}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        pct = r.roofline_pct
        lines.append(
            f"{r.kernel:<22} {r.shapes:<40} {r.max_abs_err:>11.3g} {r.max_rel_err:>11.3g} {r.tolerance:<26} "
            f"{'ok' if r.passed else 'FAIL':<4} {_us(r.estimated_seconds):>9} {_us(r.roofline_seconds):>9} "
            f"{'-' if pct is None else f'{pct:.0f}':>6} {r.bound:<5} {r.oldest_nki or 'none':<6}"
        )
        if r.reason and not r.passed:
            lines.append(f"    reason: {r.reason}")
    return "\n".join(lines)
