"""``vllm-nki-moe export-contest OUT.py --report``: what the written drop-in wires, the share of MACs that would
run in NKI by the harness's counting rule, and the eligibility rule it meets.

Per kernel family: wired into NxDI's model (an export ``Hook`` whose kernel was found) or not, and why. rho is
``mac_ratio``'s count (the harness's ``count_nki_flop_ratio`` rule: rank 0, prefill bucket 0 of 128 tokens plus a
decode step; research/contest.md 1.3) with only the wired families' ops as NKI. Eligibility: the contest asks for
"NKI for at least 3 major parts of the model (e.g. routing, expert execution, aggregation)" (research/contest.md,
section 2); each family below names the part it stands for. Per family, whether its kernels satisfy the Python
subset of the harness's NKI release (0.3.0, Neuron SDK 2.29: research/contest.md) by the emulator's rule table
(``nki_emulator.language_rules``), with the first rule a kernel breaks. Everything here is arithmetic on the exported
file, the kernels' source and the model's shapes: only a run of the harness on trn2/trn3 measures rho, accuracy and
speed, and only its compiler says what compiles.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_nki_moe.tools import mac_ratio
from vllm_nki_moe.tools.kernel_check.shapes import KernelShapes

MIN_MAJOR_PARTS = 3  # the contest's eligibility rule
HARNESS_NKI = "0.3"  # the harness's Neuron SDK 2.29 ships NKI 0.3.0


@dataclass(frozen=True)
class Family:
    name: str
    part: str  # the major part of the model it stands for
    registry_ops: tuple[str, ...]  # the ops registry entries whose MACs it covers (mac_ratio's rows)
    hook: str | None  # the export Hook that wires it, None: no hook written yet
    nxdi_module: str  # what the drop-in would replace
    kernels: tuple[str, ...] = ()  # "file.function" of the kernels the export ships for it (kernels/)


FAMILIES = (
    Family(
        "rmsnorm",
        "normalisation",
        ("rms_norm", "fused_add_rms_norm"),
        "rmsnorm",
        "RMSNorm (layer and q/k norms)",
        ("rmsnorm.rms_norm", "rmsnorm.fused_add_rms_norm"),
    ),
    Family(
        "rope",
        "positional encoding",
        ("apply_rope", "qk_norm_rope"),
        "rope",
        "rotary embedding",
        ("rope.rope",),
    ),
    Family(
        "router",
        "routing",
        ("router_gate_topk", "router_topk"),
        "router",
        "router (RouterTopK)",
        ("router.router_topk", "router.router_topk_matmul"),
    ),
    Family(
        "moe decode",
        "expert execution",
        ("moe_block",),
        "moe_decode",
        "token-generation MoE",
        ("moe_nxdi.moe_decode_nxdi",),
    ),
    Family(
        "moe prefill",
        "expert execution",
        ("moe_experts",),
        "moe_prefill",
        "context-encoding blockwise experts",
        ("moe_prefill.moe_prefill_nxdi",),
    ),
    Family(
        "attn prefill",
        "attention",
        ("attention_prefill",),
        "attention_prefill",
        "context-encoding attention",
        ("attention_prefill.attention_prefill",),
    ),
    Family(
        "attn decode",
        "attention",
        ("attention_decode",),
        "attention_decode",
        "token-generation attention (on its KV cache)",
        ("attention_decode.attention_decode",),
    ),
    Family("projections", "projections", ("linear",), None, "q/k/v, o and LM head projections", ("linear.linear",)),
)


def harness_nki_violations(family: Family, version: str = HARNESS_NKI) -> list[str]:
    """``file.function: rule`` for each of the family's kernels (those the export ships) that NKI ``version``
    rejects (first rule each)."""
    from nki_emulator import language_rules
    from vllm_nki_moe.ops.kernel_call import load_kernels

    found = []
    for name in family.kernels:
        file, function = name.split(".")
        violations = language_rules.check(getattr(load_kernels(file), function), version)
        if violations:
            found.append(f"{name}: {violations[0].format(version)}")
    return found


@dataclass(frozen=True)
class Report:
    rows: list[tuple[Family, str | None]]  # family, None (wired) or why not
    nki_violations: dict[str, list[str]]  # family name -> what the harness's NKI release rejects in its kernels
    prefill_ratio: float
    decode_ratio: float
    rho: float
    parts: tuple[str, ...]  # major parts with NKI

    @property
    def eligible(self) -> bool:
        return len(self.parts) >= MIN_MAJOR_PARTS


def build_report(hooks: dict[str, str | None], shapes: KernelShapes) -> Report:
    """``hooks``: the export's hook name -> None (wired) or the reason it is not (``ExportResult.hooks``)."""
    rows = []
    for family in FAMILIES:
        if family.hook is None:
            why = f"no export hook into NxDI's {family.nxdi_module} yet"
        else:
            why = hooks.get(family.hook, f"hook {family.hook!r} not in this export")
        rows.append((family, why))
    nki_ops = {op for family, why in rows if why is None for op in family.registry_ops}
    prefill = mac_ratio.phase_macs(
        shapes, "prefill", mac_ratio.DEFAULT_PREFILL_TOKENS, mac_ratio.DEFAULT_PREFILL_TOKENS, nki_ops=nki_ops
    )
    decode = mac_ratio.phase_macs(
        shapes, "decode", mac_ratio.DEFAULT_DECODE_BATCH, mac_ratio.DEFAULT_CONTEXT, nki_ops=nki_ops
    )
    parts = tuple(dict.fromkeys(family.part for family, why in rows if why is None))
    violations = {family.name: harness_nki_violations(family) for family, _ in rows}
    return Report(
        rows, violations, mac_ratio.ratio(prefill), mac_ratio.ratio(decode), mac_ratio.ratio(prefill + decode), parts
    )


def format_report(report: Report, shapes: KernelShapes) -> str:
    lines = [
        f"export-contest report: {shapes.describe()}; rank 0, prefill bucket {mac_ratio.DEFAULT_PREFILL_TOKENS} "
        f"tokens, decode batch {mac_ratio.DEFAULT_DECODE_BATCH} at context {mac_ratio.DEFAULT_CONTEXT}",
        f"  {'family':<13} {'wired':<6} {'NKI ' + HARNESS_NKI:<8} {'major part':<20} why not wired",
    ]
    for family, why in report.rows:
        nki = "no" if report.nki_violations[family.name] else "ok"
        lines.append(f"  {family.name:<13} {'yes' if why is None else 'no':<6} {nki:<8} {family.part:<20} {why or ''}")
    rejected = [v for family, _ in report.rows for v in report.nki_violations[family.name]]
    if rejected:
        lines.append(f"kernels NKI {HARNESS_NKI} (the harness's release) would reject, by the emulator's rule table:")
        lines.extend(f"  {v}" for v in rejected)
    lines.append(
        f"estimated rho (NKI share of MACs, the harness's rule): {report.rho:.4f} "
        f"(prefill {report.prefill_ratio:.4f}, decode {report.decode_ratio:.4f})"
    )
    parts = ", ".join(report.parts) or "none"
    verdict = "meets" if report.eligible else "does not meet"
    lines.append(
        f"eligibility: NKI in {len(report.parts)} major part(s) ({parts}); {verdict} the contest's "
        f"'at least {MIN_MAJOR_PARTS} major parts' rule as exported"
    )
    lines.append("(estimates from the exported file and the model's shapes; only the harness on trn2/trn3 measures)")
    return "\n".join(lines)
