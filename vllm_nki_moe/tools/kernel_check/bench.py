"""``kernels bench``: the trn2 cost-model time of one Qwen3-MoE decode step and one prefill, per kernel and layer.

Steps: decode at batch 1, 8 and 32 (one new token per sequence, ``shapes.context_len`` cached tokens each) and one
512-token prefill. For each step, every case of that phase (``phase`` "decode"/"prefill", or "any") runs once in the
emulator; per layer = sum over cases of estimated time x ``calls_per_layer``; per step = per layer x layers.

Assumptions (printed with the table):
- One TP rank per logical NeuronCore at LNC=2 (trn2's default: 2 physical cores per logical core, 8 physical cores
  per chip), so a model replica at TP=t spans t logical cores and a chip holds 4/t replicas. Ranks run their kernels
  in parallel, so the step time is one rank's time.
- A kernel launched without a grid runs on one physical core and is costed as such (its LNC=2 twin core idles).
- Every decoder layer runs the per-layer cases (true for Qwen3-30B-A3B: all 48 layers are MoE layers).
- Only ops with a kernel case are counted; ``NOT_COUNTED`` lists the rest of the step (their time is not in the
  total, so tokens/s is an upper bound of what these kernels allow).
- The cost model is the emulator's (docs/emulator.md): per-engine busy time, no dependencies, optimistic.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_nki_moe.tools.kernel_check.registry import all_cases
from vllm_nki_moe.tools.kernel_check.runner import CheckRow, run_cases
from vllm_nki_moe.tools.kernel_check.shapes import KernelShapes

DECODE_BATCHES = (1, 8, 32)
PREFILL_TOKENS = 512
LNC = 2  # physical cores per logical core, trn2 default (research/nki.md 2.2)
PHYSICAL_CORES_PER_CHIP = 8  # Trainium2 chip: 8 NeuronCore-v3 (trainium2.rst)

# Parts of a forward step no kernel case covers yet (vLLM layers or host work): not in the totals.
NOT_COUNTED = (
    "qkv_proj / o_proj matmuls (vLLM linear layers)",
    "embedding, final norm, LM head, sampling",
    "tensor-parallel all-reduces (attention and MoE outputs)",
    "host scheduling, kernel launch and graph boundaries",
)


@dataclass(frozen=True)
class StepCost:
    step: str  # "decode" or "prefill"
    tokens: int
    rows: list[CheckRow]
    per_layer_seconds: float
    step_seconds: float
    tokens_per_s_per_chip: float
    failed: tuple[str, ...]  # kernels that failed or were unsupported (not counted)


def replicas_per_chip(tp: int) -> float:
    return PHYSICAL_CORES_PER_CHIP / (LNC * tp)


def step_cost(shapes: KernelShapes, step: str, tokens: int, backend: str = "emulator") -> StepCost:
    cases = [c for c in all_cases(shapes, tokens) if c.phase in (step, "any")]
    rows = run_cases(cases, backend)
    per_layer = sum((r.estimated_seconds or 0.0) * r.calls_per_layer for r in rows if r.passed)
    step_seconds = per_layer * shapes.layers
    tps = tokens / step_seconds * replicas_per_chip(shapes.tp) if step_seconds > 0 else 0.0
    failed = tuple(f"{r.kernel} ({r.shapes})" for r in rows if not r.passed)
    return StepCost(step, tokens, rows, per_layer, step_seconds, tps, failed)


def bench(shapes: KernelShapes, backend: str = "emulator") -> list[StepCost]:
    steps = [step_cost(shapes, "decode", b, backend) for b in DECODE_BATCHES]
    steps.append(step_cost(shapes, "prefill", PREFILL_TOKENS, backend))
    return steps


def _us(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e6:.2f}"


def format_bench(shapes: KernelShapes, steps: list[StepCost]) -> str:
    lines = [f"kernels bench: {shapes.describe()}", ""]
    for st in steps:
        title = f"decode, batch {st.tokens}" if st.step == "decode" else f"prefill, {st.tokens} tokens"
        lines.append(f"== {title} ==")
        lines.append(
            f"  {'kernel':<22} {'shapes':<40} {'est us':>9} {'roof us':>9} {'% roof':>6} {'x/layer':>7} {'us/layer':>9}"
        )
        for r in st.rows:
            pct = r.roofline_pct
            per_layer = (r.estimated_seconds or 0.0) * r.calls_per_layer if r.passed else None
            lines.append(
                f"  {r.kernel:<22} {r.shapes:<40} {_us(r.estimated_seconds):>9} {_us(r.roofline_seconds):>9} "
                f"{'-' if pct is None else f'{pct:.0f}':>6} {r.calls_per_layer:>7} {_us(per_layer):>9}"
                + ("" if r.passed else f"   NOT COUNTED: {r.reason}")
            )
        lines.append(
            f"  per layer {st.per_layer_seconds * 1e6:.2f} us; x {shapes.layers} layers = "
            f"{st.step_seconds * 1e3:.3f} ms per step; {st.tokens_per_s_per_chip:,.0f} tokens/s per trn2 chip"
        )
        lines.append("")
    lines.append("Assumptions:")
    lines.append(
        f"  TP={shapes.tp}: one rank per logical core at LNC={LNC}; {PHYSICAL_CORES_PER_CHIP} physical cores per chip "
        f"-> {replicas_per_chip(shapes.tp):g} replica(s) per chip; ranks run in parallel (step time = one rank's)."
    )
    lines.append(f"  {shapes.layers} layers each running the per-layer kernels; decode KV length {shapes.context_len}.")
    lines.append(
        "  Kernels without a grid run on one physical core; emulator cost model (optimistic, docs/emulator.md)."
    )
    lines.append("Not counted (no kernel case):")
    for item in NOT_COUNTED:
        lines.append(f"  - {item}")
    return "\n".join(lines)
