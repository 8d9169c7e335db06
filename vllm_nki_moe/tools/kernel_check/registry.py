"""The kernel-check case interface and the discovery of case modules.

A case is one kernel call at one set of shapes, with everything needed to check and cost it:

    KernelCase(
        kernel="rms_norm",                       # name shown in the table and matched by --only
        shapes="T=5 H=2048 bf16",                # human-readable shapes of this call
        build_inputs=lambda rng: (x, w, eps),    # seeded numpy Generator -> tuple of kernel arguments
        kernel_fn=rmsnorm.rms_norm,              # the @nki.jit kernel, called as kernel_fn(*inputs)
        reference=rmsnorm.rms_norm_ref,          # plain-torch reference, called as reference(*inputs)
        tolerance="bfloat16",                    # key of tolerances.TOLERANCES
        min_hbm_bytes=2 * 5 * 2048 * 2 + 2048 * 2,   # bytes the computation must move to/from HBM at least
        min_macs=0,                              # multiply-accumulates it must do at least (matmul-heavy kernels)
        calls_per_layer=2,                       # how often one decoder layer runs this call (for `kernels bench`)
        calls_per_step=0,                        # how often a step runs it outside the layers (the LM head: once)
        lnc_grid=False,                          # True: the kernel splits its work over a launch grid of LNC programs
        phase="any",                             # "decode", "prefill" or "any": which bench steps include it
        unsupported=None,                        # or the reason (limit and value) the kernel cannot take the shapes
        ranks=1,                                 # ranks its nki.collectives span (costed over them, this rank's values)
    )

Inputs are torch tensors (bf16 or fp32, as the model passes them) plus plain Python scalars; the emulator and the
real ``nki`` take torch tensors, and the reference gets the very same objects (it must not modify them). Kernel and
reference return the same structure: one tensor or a tuple of tensors, compared pairwise.

``min_hbm_bytes`` is what any implementation must move: each input read once and each output written once (for a
gather, only the rows it selects; for experts, only the selected experts' weights); ``min_macs`` is the arithmetic
it must do (e.g. causal attention's QK^T and PV, skipping the masked half). The roofline is the larger of the two
times (HBM bandwidth, Tensor Engine peak), and "% of roofline" is measured against it, so a kernel that moves or
computes more than it needs is charged for it.

Case modules are ``vllm_nki_moe.tools.kernel_check.cases_<family>`` for the families in ``CASE_MODULES``, each exposing
``cases(shapes: KernelShapes, tokens: int) -> list[KernelCase]``: the calls one forward pass over ``tokens`` tokens
makes at these per-rank shapes. ``tokens`` is the batch of one decode step (one token per sequence; attention
decode cases take ``shapes.context_len`` cached tokens per sequence) or the length of one prefill; a module returns
cases of either phase or both (``phase`` tells ``kernels bench`` which step they belong to). A missing
module is an error.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from vllm_nki_moe.tools.kernel_check.shapes import KernelShapes
from vllm_nki_moe.tools.kernel_check.tolerances import TOLERANCES

# Families in model order.
CASE_MODULES = ("cases_norms", "cases_linear", "cases_router", "cases_moe", "cases_attention", "cases_layers")
PHASES = ("decode", "prefill", "any")


@dataclass(frozen=True)
class KernelCase:
    """One kernel call to check against its reference and to cost (see the module docstring)."""

    kernel: str
    shapes: str
    build_inputs: Callable[[np.random.Generator], tuple]
    kernel_fn: Any
    reference: Callable[..., Any]
    tolerance: str
    min_hbm_bytes: int
    min_macs: int = 0
    calls_per_layer: int = 1
    calls_per_step: int = 0
    lnc_grid: bool = False
    phase: str = "any"
    unsupported: str | None = None
    covers: tuple[str, ...] = ()  # step parts (bench.KERNEL_PARTS) this kernel does, besides any in its name
    ranks: int = 1  # tensor-parallel ranks its in-kernel collectives span (the emulator costs them: solo_rank)
    reference_grid: bool = False  # the reference runs kernels itself and takes the case's launch grid (grid=...)

    def __post_init__(self) -> None:
        if self.tolerance not in TOLERANCES:
            raise ValueError(
                f"KernelCase {self.kernel}: tolerance={self.tolerance!r}; must be one of {', '.join(TOLERANCES)}"
            )
        if self.phase not in PHASES:
            raise ValueError(f"KernelCase {self.kernel}: phase={self.phase!r}; must be one of {', '.join(PHASES)}")
        if self.min_hbm_bytes < 0 or self.min_macs < 0 or self.calls_per_layer < 0 or self.calls_per_step < 0:
            raise ValueError(
                f"KernelCase {self.kernel}: min_hbm_bytes={self.min_hbm_bytes}, calls_per_layer={self.calls_per_layer}"
                "; must be >= 0"
            )


def case_modules() -> list:
    """The case modules, in ``CASE_MODULES`` order; a missing one is an error (a renamed file must not silently drop
    its kernels from the check)."""
    return [importlib.import_module(f"{__package__}.{name}") for name in CASE_MODULES]


def all_cases(shapes: KernelShapes, tokens: int, only: str | None = None) -> list[KernelCase]:
    """Every case of every present module for ``tokens`` tokens; ``only`` keeps the kernels it names (see below)."""
    cases: list[KernelCase] = []
    for module in case_modules():
        cases.extend(module.cases(shapes, tokens))
    if only:
        # A name equal to some case's kernel selects exactly that kernel ("router_topk" not "router_topk_matmul",
        # "rope" not "qk_norm_rope"); any other name selects the kernels containing it ("rms_norm").
        wanted = [w.strip() for w in only.split(",") if w.strip()]
        names = {c.kernel for c in cases}
        cases = [c for c in cases if any(w == c.kernel or (w not in names and w in c.kernel) for w in wanted)]
    return cases
