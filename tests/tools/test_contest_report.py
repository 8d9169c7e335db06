"""``export-contest --report``: families wired or not, rho by the harness's rule worked by hand, eligibility."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vllm_nki_moe.tools import cli, contest_report
from vllm_nki_moe.tools.kernel_check.shapes import kernel_shapes

# Qwen3-30B-A3B at TP 4 (config.json; per rank: 8 q heads, 1 kv head of 128, expert intermediate 192), 48 MoE layers
L, H, D, Q, KV, E, K, INTER, V = 48, 2048, 128, 8, 1, 128, 8, 192, 151936 // 4


def _hand_macs(tokens: int, context: int, rows: int) -> dict[str, int]:
    """The harness's dot MACs of one step on rank 0 (research/contest.md 1.3), by hand."""
    return {
        "qkv": L * tokens * H * (Q + 2 * KV) * D,
        "attention": L * 2 * Q * tokens * context * D,
        "o": L * tokens * Q * D * H,
        "router": L * tokens * H * E,
        "experts": L * tokens * K * 3 * H * INTER,
        "lm_head": rows * H * V,
    }


SHAPES = kernel_shapes(None, 4)


AS_EXPORTED = {
    "rmsnorm": None,
    "rope": None,
    "attention_prefill": None,
    "attention_decode": None,
    "router": None,
    "moe_decode": None,
    "moe_prefill": None,
}


def _as_exported_rho() -> float:
    """Norms, RoPE, attention, router and the experts of both phases wired: the attention's, the router's and the
    experts' MACs (norms and RoPE have no dot MACs) over all, by hand."""
    prefill, decode = _hand_macs(128, 128, 1), _hand_macs(1, 640, 1)
    nki = sum(m[k] for m in (prefill, decode) for k in ("attention", "router", "experts"))
    return nki / (sum(prefill.values()) + sum(decode.values()))


PARTS = ("normalisation", "positional encoding", "routing", "expert execution", "attention")


def test_as_exported_every_family_but_the_projections_is_wired_and_the_entry_is_eligible():
    shapes = kernel_shapes(None, 4)
    report = contest_report.build_report(AS_EXPORTED, shapes)
    wired = [family.name for family, why in report.rows if why is None]
    assert wired == ["rmsnorm", "rope", "router", "moe decode", "moe prefill", "attn prefill", "attn decode"]
    assert report.rho == pytest.approx(_as_exported_rho(), rel=1e-12)
    assert report.parts == PARTS and report.eligible
    why = dict((family.name, why) for family, why in report.rows)
    assert why["projections"] == "no export hook into NxDI's q/k/v, o and LM head projections yet"
    unwired = contest_report.build_report({**AS_EXPORTED, "router": "kernels/router.py is not present"}, shapes)
    assert dict((f.name, w) for f, w in unwired.rows)["router"] == "kernels/router.py is not present"
    assert unwired.parts == tuple(p for p in PARTS if p != "routing") and unwired.eligible
    one_attention = contest_report.build_report({**AS_EXPORTED, "attention_decode": "left out by --skip"}, shapes)
    assert one_attention.parts == PARTS  # prefill attention alone still puts NKI in the attention part


def test_rho_follows_the_harness_rule_worked_by_hand(monkeypatch):
    """Wire router, experts (both phases) and attention: rho = their MACs over all MACs, prefill 128 tokens plus one
    decode token at context 640, unweighted."""
    families = tuple(
        contest_report.Family(f.name, f.part, f.registry_ops, f.hook or f.name, f.nxdi_module)
        for f in contest_report.FAMILIES
    )
    monkeypatch.setattr(contest_report, "FAMILIES", families)
    wired = ("router", "moe decode", "moe prefill", "attn prefill", "attn decode")
    hooks = {f.hook: None if f.name in wired else "not in this export" for f in families}
    report = contest_report.build_report(hooks, kernel_shapes(None, 4))
    prefill, decode = _hand_macs(128, 128, 1), _hand_macs(1, 640, 1)
    nki = sum(m[k] for m in (prefill, decode) for k in ("router", "experts", "attention"))
    assert report.rho == pytest.approx(nki / (sum(prefill.values()) + sum(decode.values())), rel=1e-12)
    assert report.parts == ("routing", "expert execution", "attention") and report.eligible


def test_cli_prints_the_report_and_checks_tp_before_writing(tmp_path, capsys):
    out = tmp_path / "qwen_with_nki.py"
    assert cli.main(["export-contest", str(out), "--report"]) == 0
    text = capsys.readouterr().out
    assert f"estimated rho (NKI share of MACs, the harness's rule): {_as_exported_rho():.4f}" in text
    assert f"NKI in 5 major part(s) ({', '.join(PARTS)}); meets" in text
    bad = tmp_path / "bad.py"
    assert cli.main(["export-contest", str(bad), "--report", "--tp", "3"]) == 2
    assert "--tp 3" in capsys.readouterr().err and not bad.exists()


def test_every_family_ships_kernels_the_harness_nki_release_accepts():
    """NKI 0.3 (Neuron SDK 2.29, the harness's) has no 0.5 view primitives and no 0.6 fori_loop: views are access
    patterns (kernels/views.py), and the drop-in's prefill experts loop with dynamic_range; by the emulator's rule
    table nothing the export ships is rejected, under 0.3 or 0.6."""
    for version in ("0.3", "0.6"):
        assert all(not contest_report.harness_nki_violations(f, version) for f in contest_report.FAMILIES), version
    text = contest_report.format_report(contest_report.build_report(AS_EXPORTED, SHAPES), SHAPES)
    assert "would reject" not in text
    rows = text.splitlines()[2 : 2 + len(contest_report.FAMILIES)]
    assert [line[23:31].strip() for line in rows] == ["ok"] * len(contest_report.FAMILIES), text  # NKI 0.3 column


def test_a_kernel_the_harness_release_rejects_is_named_with_its_rule(monkeypatch):
    serving = tuple(  # ship the serving moe_prefill instead (nl.fori_loop: NKI 0.6)
        replace(f, kernels=("moe_prefill.moe_prefill",)) if f.name == "moe prefill" else f
        for f in contest_report.FAMILIES
    )
    monkeypatch.setattr(contest_report, "FAMILIES", serving)
    families = {f.name: f for f in contest_report.FAMILIES}
    prefill = contest_report.harness_nki_violations(families["moe prefill"])
    assert len(prefill) == 1 and "fori_loop" in prefill[0] and "available from NKI 0.6" in prefill[0]
    text = contest_report.format_report(contest_report.build_report(AS_EXPORTED, SHAPES), SHAPES)
    assert "kernels NKI 0.3 (the harness's release) would reject" in text and "moe_prefill.moe_prefill:" in text
    assert "  moe prefill   yes    no " in text
