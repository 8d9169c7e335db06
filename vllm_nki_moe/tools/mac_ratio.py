"""``vllm-nki-moe mac-ratio``: the share of a step's MACs that run in NKI kernels, counted as the contest counts it.

The contest harness (``aws-neuron/nki-moe@f742418``, ``main.py``, ``count_nki_flop_ratio``; research/contest.md 1.3)
reads the HLO of rank 0, bucket 0 of the prefill (context-encoding) and decode (token-generation) graphs; every
``dot`` adds batch x lhs-free x contracting x rhs-free MACs to the total, every NKI custom call
(``AwsNeuronCustomNativeKernel``) adds its ``mac_count`` to both the NKI sum and the total, and
``rho = (nki_prefill + nki_decode) / (all_prefill + all_decode)``, unweighted by how often each graph runs.

Here the same sums come from the model's shapes (one rank, ``--tokens`` prefill tokens, ``--batch`` decode rows of
``--context`` cached tokens), op by op; an op counts as NKI when the ops registry (``vllm_nki_moe.ops.SPECS``) gives
it a kernel and the backend is ``nki``, so the figure follows the code, never a hand list (vLLM's linear layers,
q/k/v, o, dense MLP and LM head, run the ``linear`` op under kernel backends: ``models.linear_method``). Expert MACs
are the routed work
(tokens x top-k x 3 matmuls), what an NKI kernel's ``mac_count`` reports; a dense torch path that multiplies every
expert would count more. Attention counts both products over the full context, as the harness counts ``dot`` shapes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from vllm_nki_moe.tools.kernel_check.shapes import KernelShapes

DEFAULT_PREFILL_TOKENS = 128  # the harness's context-encoding bucket 0
DEFAULT_DECODE_BATCH = 1
DEFAULT_CONTEXT = 640  # the contest's sequence length


@dataclass(frozen=True)
class MacRow:
    op: str
    macs: int
    nki: bool
    registry_op: str | None  # the ops registry entry that runs it, or None for vLLM's layers


def _kernel_ops(kernels: str) -> set[str]:
    from vllm_nki_moe.ops import SPECS

    if kernels == "torch":
        return set()
    return {name for name, spec in SPECS.items() if spec.kernel is not None}


def phase_macs(
    shapes: KernelShapes,
    phase: str,
    tokens: int,
    context: int,
    kernels: str = "nki",
    nki_ops: set[str] | None = None,
) -> list[MacRow]:
    """MACs of one step on one rank: ``phase`` "prefill" (``tokens`` tokens of one sequence, ``context`` = tokens) or
    "decode" (``tokens`` sequences, one token each, ``context`` cached tokens each). The ops counted as NKI: those
    with a kernel under ``kernels``, or exactly ``nki_ops`` when given (e.g. what a contest export wires)."""
    nki_ops = _kernel_ops(kernels) if nki_ops is None else nki_ops
    h, d = shapes.hidden, shapes.head_dim
    q, kv = shapes.q_heads, shapes.kv_heads
    sequences = 1 if phase == "prefill" else tokens
    dense_layers = shapes.layers - shapes.moe_layers
    attention_op = "attention_prefill" if phase == "prefill" else "attention_decode"
    router_op = "moe_block" if phase == "decode" and "moe_block" in nki_ops else "router_gate_topk"
    experts_op = "moe_block" if phase == "decode" and "moe_block" in nki_ops else "moe_experts"
    layers = shapes.layers
    rows = [
        ("qkv_proj", layers * tokens * h * (q + 2 * kv) * d, "linear"),
        ("attention (q k^T, p v)", layers * 2 * q * tokens * context * d, attention_op),
        ("o_proj", layers * tokens * q * d * h, "linear"),
        ("router gate", shapes.moe_layers * tokens * h * shapes.experts, router_op),
        (
            "experts (routed)",
            shapes.moe_layers * tokens * shapes.top_k * 3 * h * shapes.moe_intermediate,
            experts_op,
        ),
        ("dense MLP", dense_layers * tokens * 3 * h * shapes.intermediate, "linear"),
        ("lm_head", sequences * h * -(-shapes.vocab // shapes.tp), "linear"),
    ]
    return [MacRow(op, macs, registry in nki_ops, registry) for op, macs, registry in rows if macs]


def ratio(rows: list[MacRow]) -> float:
    total = sum(r.macs for r in rows)
    return sum(r.macs for r in rows if r.nki) / total if total else 0.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", help="Hugging Face Qwen3-MoE config.json (default: Qwen3-30B-A3B's values)")
    source.add_argument("--model", help="a checkpoint directory or Hugging Face model id whose config.json to read")
    parser.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=4, help="TP degree (default 4)")
    parser.add_argument("--kernels", choices=("nki", "torch"), default="nki", help="backend of the ops (default nki)")
    parser.add_argument(
        "--tokens", type=int, default=DEFAULT_PREFILL_TOKENS, help="prefill tokens (default 128, bucket 0)"
    )
    parser.add_argument("--batch", type=int, default=DEFAULT_DECODE_BATCH, help="decode rows (default 1)")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="decode KV length (default 640)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")


def run_mac_ratio(args: argparse.Namespace) -> int:
    from vllm_nki_moe.tools.kernel_check.shapes import ShapesError, kernel_shapes, model_config_path

    for name in ("tokens", "batch", "context"):
        if getattr(args, name) < 1:
            print(f"error: mac-ratio: --{name}={getattr(args, name)}; must be a positive integer")
            return 2
    try:
        config = model_config_path(args.model) if args.model else args.config
        shapes = kernel_shapes(config, args.tp)
    except ShapesError as err:
        print(f"error: mac-ratio: {err}")
        return 2
    phases = {
        "prefill": phase_macs(shapes, "prefill", args.tokens, args.tokens, args.kernels),
        "decode": phase_macs(shapes, "decode", args.batch, args.context, args.kernels),
    }
    both = phases["prefill"] + phases["decode"]
    result = {
        "model": shapes.name,
        "tp": shapes.tp,
        "kernels": args.kernels,
        "prefill_tokens": args.tokens,
        "decode_batch": args.batch,
        "context": args.context,
        "prefill_ratio": ratio(phases["prefill"]),
        "decode_ratio": ratio(phases["decode"]),
        "nki_mac_ratio": ratio(both),
        "rows": {phase: [asdict(r) for r in rows] for phase, rows in phases.items()},
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"mac-ratio: {shapes.describe()}; kernels={args.kernels}; rank 0")
    for phase, rows in phases.items():
        what = f"{args.tokens} tokens" if phase == "prefill" else f"batch {args.batch}, context {args.context}"
        print(f"== {phase}, {what} ==")
        print(f"  {'op':<26} {'MACs':>18} {'NKI':<4} registry op")
        for r in rows:
            print(f"  {r.op:<26} {r.macs:>18,} {'yes' if r.nki else 'no':<4} {r.registry_op or '- (vLLM layer)'}")
        print(f"  {phase} NKI share: {ratio(rows):.4f}")
    print(f"nki_mac_ratio (prefill + decode, the harness's rule): {result['nki_mac_ratio']:.4f}")
    return 0
