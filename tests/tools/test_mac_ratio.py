"""``vllm-nki-moe mac-ratio`` against MACs counted by hand, and the NKI set derived from the ops registry."""

from __future__ import annotations

import json

import pytest

from vllm_nki_moe import ops
from vllm_nki_moe.tools import mac_ratio
from vllm_nki_moe.tools.cli import main
from vllm_nki_moe.tools.kernel_check.shapes import kernel_shapes

# 2 layers, the second dense (mlp_only_layers), hidden 64, 4 q / 2 kv heads of 16, 8 experts top-2, expert
# intermediate 32, dense intermediate 48, vocab 100; at TP 2 a rank has 2 q heads, 1 kv head, I 16, dense I 24, 50 rows
# of the LM head.
TINY = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "mlp_only_layers": [1],
    "norm_topk_prob": True,
    "vocab_size": 100,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
}
# Prefill of 4 tokens on one rank, by hand:
PREFILL = {
    "qkv_proj": 2 * 4 * 64 * (2 + 2 * 1) * 16,  # 32,768
    "attention (q k^T, p v)": 2 * 2 * 2 * 4 * 4 * 16,  # layers x (QK^T + PV) x q heads x T x S x D = 2,048
    "o_proj": 2 * 4 * (2 * 16) * 64,  # 16,384
    "router gate": 1 * 4 * 64 * 8,  # the MoE layer only: 2,048
    "experts (routed)": 1 * 4 * 2 * 3 * 64 * 16,  # T x K x (gate, up, down) x H x I: 24,576
    "dense MLP": 1 * 4 * 3 * 64 * 24,  # 18,432
    "lm_head": 1 * 64 * 50,  # the one sampled row: 3,200
}


def test_prefill_macs_match_the_hand_count_and_the_nki_ops_come_from_the_registry():
    rows = mac_ratio.phase_macs(kernel_shapes(TINY, 2), "prefill", 4, 4, "nki")
    assert {r.op: r.macs for r in rows} == PREFILL
    for r in rows:  # NKI exactly where the registry binds a kernel
        assert r.nki == (r.registry_op is not None and ops.SPECS[r.registry_op].kernel is not None)
    assert {r.op: r.registry_op for r in rows} == {
        "qkv_proj": "linear",
        "attention (q k^T, p v)": "attention_prefill",
        "o_proj": "linear",
        "router gate": "router_gate_topk",
        "experts (routed)": "moe_experts",
        "dense MLP": "linear",
        "lm_head": "linear",
    }
    assert mac_ratio.ratio(rows) == 1.0  # every matmul of the step has a kernel today


def test_an_op_without_a_kernel_counts_outside_nki(monkeypatch):
    import dataclasses

    specs = dict(ops.SPECS)
    specs["linear"] = dataclasses.replace(specs["linear"], kernel=None)  # as before kernels/linear.py existed
    monkeypatch.setattr(ops, "SPECS", specs)
    rows = mac_ratio.phase_macs(kernel_shapes(TINY, 2), "prefill", 4, 4, "nki")
    linear_macs = PREFILL["qkv_proj"] + PREFILL["o_proj"] + PREFILL["dense MLP"] + PREFILL["lm_head"]
    total = sum(PREFILL.values())
    assert mac_ratio.ratio(rows) == pytest.approx((total - linear_macs) / total)


def test_decode_counts_the_whole_context_and_one_lm_head_row_per_sequence():
    rows = {r.op: r for r in mac_ratio.phase_macs(kernel_shapes(TINY, 2), "decode", 3, 10, "nki")}
    assert rows["attention (q k^T, p v)"].macs == 2 * 2 * 2 * 3 * 10 * 16
    assert rows["lm_head"].macs == 3 * 64 * 50
    assert rows["experts (routed)"].registry_op == "moe_block"  # the fused decode block carries router and experts


def test_torch_kernels_put_nothing_in_nki():
    rows = mac_ratio.phase_macs(kernel_shapes(TINY, 2), "prefill", 4, 4, "torch")
    assert mac_ratio.ratio(rows) == 0.0


def test_cli_json_is_the_harness_rule_over_both_phases(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    argv = ["mac-ratio", "--config", str(tmp_path / "config.json"), "--tp", "2", "--tokens", "4", "--batch", "3"]
    assert main([*argv, "--context", "10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = [r for phase in ("prefill", "decode") for r in out["rows"][phase]]
    nki = sum(r["macs"] for r in rows if r["nki"])
    assert out["nki_mac_ratio"] == pytest.approx(nki / sum(r["macs"] for r in rows))
    assert out["decode_ratio"] == 1.0 and out["kernels"] == "nki" and out["tp"] == 2


def test_qwen3_30b_a3b_table(capsys):
    assert main(["mac-ratio"]) == 0
    out = capsys.readouterr().out
    assert "Qwen3-30B-A3B TP=4" in out and "experts (routed)" in out
    assert "nki_mac_ratio (prefill + decode, the harness's rule): 1.0000" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tp", "3"], "num_attention_heads=32"),
        (["--tokens", "0"], "--tokens=0; must be a positive integer"),
        (["--config", "/no/such/config.json"], "file not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(["mac-ratio", *argv]) == 2
    out = capsys.readouterr().out.strip()
    assert out.startswith("error: mac-ratio:") and message in out and len(out.splitlines()) == 1


def test_unknown_kernels_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["mac-ratio", "--kernels", "emulator"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
