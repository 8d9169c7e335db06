"""``kernels bench``: the trn2 cost-model time of one Qwen3-MoE decode step and one prefill, kernels and the rest.

Steps: decode at batch 1, 8 and 32 (one new token per sequence, ``shapes.context_len`` cached tokens each) and one
512-token prefill; for a MoE model the decode steps and the prefill again as an FP8 checkpoint's
(``KernelShapes.fp8``). For each step, every case of that phase (``phase`` "decode"/"prefill", or "any") runs once in
the emulator; kernels per layer = sum over cases of estimated time x ``calls_per_layer``, x layers. The rest of the
step (projections and LM head while they have no kernel, all-reduces, embedding, final norm, sampling, kernel
boundaries) comes from ``step_model``, each part with its basis; the whole step is the sum. Decode steps are compared
with their memory wall (``step_model.limit_seconds``).

Assumptions (printed with the table):
- One TP rank per logical NeuronCore at LNC=2 (trn2's default: 2 physical cores per logical core, 8 physical cores
  per chip), so a model replica at TP=t spans t logical cores and a chip holds 4/t replicas. Ranks run their kernels
  in parallel, so the step time is one rank's time.
- A kernel written for a launch grid (``KernelCase.lnc_grid``) runs LNC programs, one per physical core, costed as its
  slowest program; a kernel launched without a grid runs on one physical core (its LNC=2 twin core idles).
- Every decoder layer runs the per-layer cases (true for Qwen3-30B-A3B: all 48 layers are MoE layers; in an FP8
  step the first layer, with no residual to add, runs the attention half op by op, counted as the fused block).
- The cost model is the emulator's (docs/emulator.md): each instruction scheduled on its engine after the data it
  reads is written ("est us"); "engines" is the busiest engine's work alone (perfect overlap, the old optimistic
  bound); parts in sequence add up (no overlap between kernels).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nki_emulator import collectives, targets
from vllm_nki_moe.tools.kernel_check.registry import all_cases
from vllm_nki_moe.tools.kernel_check.runner import CheckRow, run_cases
from vllm_nki_moe.tools.kernel_check.shapes import KernelShapes
from vllm_nki_moe.tools.kernel_check.step_model import (
    KERNEL_BOUNDARY_SECONDS,
    StepPart,
    limit_seconds,
    logical_core_size,
    rest_of_step,
)

DECODE_BATCHES = (1, 8, 32)
PREFILL_TOKENS = 512

# What the estimate leaves out because nothing published or modelled here bounds it.
NOT_ESTIMATED = (
    "host work between steps (vLLM's scheduler, input preparation, output processing; async scheduling hides part)",
    "engine pipeline latency and semaphore waits inside a kernel (the cost model orders instructions by their data, "
    "each taking its issue cost)",
)
# Names of step parts that a kernel case takes over once it exists (a case whose kernel name contains the part name).
KERNEL_PARTS = ("qkv_proj", "o_proj", "lm_head", "final_norm", "silu_mul", "all_reduce")


@dataclass(frozen=True)
class StepCost:
    step: str  # "decode" or "prefill"
    tokens: int
    rows: list[CheckRow]
    per_layer_seconds: float  # the kernel cases' time per layer
    kernels_seconds: float  # per layer x layers
    rest: list[StepPart]  # the rest of the step (step_model)
    step_seconds: float  # the whole step: kernels + rest
    tokens_per_s_per_chip: float
    failed: tuple[str, ...]  # kernels that failed or were unsupported (not counted)
    limit_seconds: float | None = None  # decode: the memory wall of the step
    fp8: bool = False  # the step of an FP8 checkpoint (block-scaled FP8 experts and projections)


def replicas_per_chip(tp: int) -> float:
    return targets.current().cores_per_chip / (logical_core_size() * tp)


def step_cost(
    shapes: KernelShapes, step: str, tokens: int, backend: str = "emulator", lnc: int | None = None
) -> StepCost:
    lnc = logical_core_size() if lnc is None else lnc
    cases = [c for c in all_cases(shapes, tokens) if c.phase in (step, "any")]
    rows = run_cases(cases, backend, lnc=lnc)
    counted = [r for r in rows if r.passed and (r.calls_per_layer or r.calls_per_step)]
    per_layer = sum((r.estimated_seconds or 0.0) * r.calls_per_layer for r in counted)
    per_step = sum((r.estimated_seconds or 0.0) * r.calls_per_step for r in counted)
    kernels_seconds = per_layer * shapes.layers + per_step
    covered = {part for part in KERNEL_PARTS if any(part in r.kernel or part in r.covers for r in counted)}
    calls = sum(r.calls_per_layer for r in counted) * shapes.layers + sum(r.calls_per_step for r in counted)
    rest = rest_of_step(shapes, tokens, covered, calls)
    step_seconds = kernels_seconds + sum(p.step_seconds for p in rest)
    tps = tokens / step_seconds * replicas_per_chip(shapes.tp) if step_seconds > 0 else 0.0
    failed = tuple(f"{r.kernel} ({r.shapes})" for r in rows if not r.passed)
    limit = limit_seconds(shapes, tokens) if step == "decode" else None
    return StepCost(step, tokens, rows, per_layer, kernels_seconds, rest, step_seconds, tps, failed, limit, shapes.fp8)


def step_line(st: StepCost) -> str:
    """``decode step, batch B: X ms per token (limit Y ms, Z% of it)``: Z = limit / step (100% = at the wall)."""
    if st.step == "decode":
        pct = 100.0 * st.limit_seconds / st.step_seconds if st.step_seconds else 0.0
        return (
            f"decode step{' with FP8 weights' if st.fp8 else ''}, batch {st.tokens}: "
            f"{st.step_seconds * 1e3:.3f} ms per token "
            f"(limit {st.limit_seconds * 1e3:.3f} ms, {pct:.0f}% of it)"
        )
    rate = st.tokens / st.step_seconds if st.step_seconds else 0.0
    fp8 = " with FP8 weights" if st.fp8 else ""
    return f"prefill step{fp8}, {st.tokens} tokens: {st.step_seconds * 1e3:.3f} ms ({rate:,.0f} tokens/s)"


def bench(shapes: KernelShapes, backend: str = "emulator", lnc: int | None = None) -> list[StepCost]:
    steps = [step_cost(shapes, "decode", b, backend, lnc) for b in DECODE_BATCHES]
    steps.append(step_cost(shapes, "prefill", PREFILL_TOKENS, backend, lnc))
    if shapes.experts and not shapes.fp8:  # the steps again for an FP8 checkpoint
        fp8 = replace(shapes, fp8=True)
        steps += [step_cost(fp8, "decode", b, backend, lnc) for b in DECODE_BATCHES]
        steps.append(step_cost(fp8, "prefill", PREFILL_TOKENS, backend, lnc))
    return steps


def _us(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e6:.2f}"


def format_bench(shapes: KernelShapes, steps: list[StepCost]) -> str:
    target = targets.current()
    lines = [f"kernels bench: {shapes.describe()}; target {target.name}", ""]
    for st in steps:
        title = f"decode, batch {st.tokens}" if st.step == "decode" else f"prefill, {st.tokens} tokens"
        title += ", FP8 weights (experts and projections)" if st.fp8 else ""
        lines.append(f"== {title} ==")
        lines.append(
            f"  {'kernel':<22} {'shapes':<40} {'est us':>9} {'engines':>9} {'roof us':>9} {'% roof':>6} {'x/layer':>7} "
            f"{'us/layer':>9}"
        )
        for r in st.rows:
            pct = r.roofline_pct
            per_layer = (r.estimated_seconds or 0.0) * r.calls_per_layer if r.passed else None
            calls = f"{r.calls_per_step}/step" if r.calls_per_step else str(r.calls_per_layer)
            lines.append(
                f"  {r.kernel:<22} {r.shapes:<40} {_us(r.estimated_seconds):>9} {_us(r.engine_bound_seconds):>9} "
                f"{_us(r.roofline_seconds):>9} "
                f"{'-' if pct is None else f'{pct:.0f}':>6} {calls:>7} {_us(per_layer):>9}"
                + ("" if r.passed else f"   NOT COUNTED: {r.reason}")
            )
        once = st.kernels_seconds - st.per_layer_seconds * shapes.layers
        lines.append(
            f"  kernels: {st.per_layer_seconds * 1e6:.2f} us per layer x {shapes.layers} layers"
            + (f" + {once * 1e6:.2f} us once per step" if once > 0 else "")
            + f" = {st.kernels_seconds * 1e3:.3f} ms"
        )
        lines.append(f"  {'rest of the step':<34} {'us each':>9} {'x/step':>7} {'us/step':>9}  basis")
        for p in st.rest:
            lines.append(f"  {p.name:<34} {p.seconds * 1e6:>9.2f} {p.count:>7} {p.step_seconds * 1e6:>9.2f}  {p.basis}")
        lines.append(f"  {step_line(st)}; {st.tokens_per_s_per_chip:,.0f} tokens/s per {target.name} chip")
        lines.append("")
    for st in steps:
        lines.append(step_line(st))
    lines.append("")
    lines.append("Assumptions:")
    lines.append(
        f"  {target.name} ({target.core}), TP={shapes.tp}: one rank per logical core at LNC={logical_core_size()}; "
        f"{target.cores_per_chip} physical cores per chip "
        f"-> {replicas_per_chip(shapes.tp):g} replica(s) per chip; ranks run in parallel (step time = one rank's)."
    )
    lines.append(f"  {shapes.layers} layers each running the per-layer kernels; decode KV length {shapes.context_len}.")
    if any(r.kernel == "attention_block_decode_fp8" and r.calls_per_layer for st in steps for r in st.rows):
        lines.append(
            "  FP8 steps with attention_block_decode_fp8: counted in every layer (the first layer, with no residual "
            "to add, runs those ops one by one)."
        )
    if any(r.kernel == "decoder_layers_decode_fp8" and r.calls_per_step for st in steps for r in st.rows):
        lines.append(
            "  FP8 steps with decoder_layers_decode_fp8: every layer and its two all-reduces in that one launch (the "
            "first layer's residual is zero); the all-reduces are timed inside it, over the TP ranks (solo_rank)."
        )
    grid = sorted({r.kernel.split(".")[0] for st in steps for r in st.rows if r.lnc_grid})
    lines.append(
        f"  Kernels written for a grid ({', '.join(grid) or 'none'}) run LNC programs, one per physical core; the "
        "others run on one physical core (its twin idles); emulator cost model (optimistic, docs/emulator.md)."
    )
    lines.append(
        f"  Collectives: {collectives.COLLECTIVE_HOP_SECONDS * 1e6:g} us per hop "
        "(AWS intra-node collectives note: 1-2 us); "
        f"kernel boundary {KERNEL_BOUNDARY_SECONDS * 1e6:g} us each (an assumption, not published)."
    )
    lines.append("  Limit: the step's weights and KV cache read once at the logical core's HBM bandwidth (LNC cores).")
    lines.append("Not estimated:")
    for item in NOT_ESTIMATED:
        lines.append(f"  - {item}")
    return "\n".join(lines)
