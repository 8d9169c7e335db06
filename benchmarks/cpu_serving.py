"""Throughput of vLLM offline generation on CPU: this plugin's model class vs vLLM's own, same checkpoint
(Qwen3-MoE by default; ``--arch qwen3|llama`` for the dense classes).

Not a test: it prints figures. Each (implementation, batch) runs in a fresh process (vLLM's engine is process-wide);
vLLM's own class runs with ``VLLM_PLUGINS=""`` (no plugin loaded at all). Both run eagerly (``enforce_eager``) unless
``--compile`` (vLLM's default compiled mode: Dynamo traces the decoder stack once, Inductor compiles it). Ours runs
``VLLM_NKI_MOE_KERNELS=torch``: its ops are the ``*_host`` fast path (vLLM's CPU custom ops, ``ops.host``) unless
``--host-ops off`` selects the plain references; the table names which one ran. The 1-minute load average is printed
before and after: the machine is shared, and figures taken under load are not comparable.

    .venv/bin/python benchmarks/cpu_serving.py                 # mid-size checkpoint, batch 1 and 32
    .venv/bin/python benchmarks/cpu_serving.py --batches 1,8,32 --new-tokens 64 --repeats 3
    .venv/bin/python benchmarks/cpu_serving.py --host-ops off  # our class on the plain-PyTorch reference ops
    .venv/bin/python benchmarks/cpu_serving.py --arch llama    # a mid-size Llama 3 checkpoint (dense)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# hidden 512, 4 layers, 32 experts top-4, as the issue suggests; head_dim 64 (vLLM CPU attention sizes).
MID_SIZE = {
    "hidden_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 256,
    "intermediate_size": 1024,
    "vocab_size": 512,
}
MOE_ONLY = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")
PROMPT = "On the first day of Christmas my true love sent to me a partridge in a pear tree. "


def worker(args: argparse.Namespace) -> None:
    """Child process: time greedy generation for one batch size, print a JSON line."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=1024,
        enforce_eager=not args.compile,
        seed=0,
        max_num_seqs=max(args.batch, 1),
    )
    model = llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    opset = getattr(model, "opset", None)
    # which implementation our experts (dense: RMSNorm) op ran: the vLLM-CPU fast path (*_host) or the reference
    op = "moe_experts" if args.arch == "qwen3_moe" else "rms_norm"
    ops_module = opset.implementations[op].__name__ if opset is not None else "vllm"
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    prompts = [f"{i} {PROMPT}" for i in range(args.batch)]
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
    print(
        "RESULT "
        + json.dumps(
            {
                "class": f"{type(model).__module__}.{type(model).__name__}",
                "ops": ops_module,
                "tokens_per_s": statistics.median(rates),
            }
        )
    )


def run_child(model: Path, batch: int, ours: bool, args: argparse.Namespace) -> dict:
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_NKI_MOE_KERNELS": "torch",
        "VLLM_NKI_MOE_HOST_OPS": args.host_ops,
    }
    if not ours:
        env["VLLM_PLUGINS"] = ""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--model",
        str(model),
        "--batch",
        str(batch),
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
        "--dtype",
        args.dtype,
        "--arch",
        args.arch,
    ]
    if args.compile:
        cmd.append("--compile")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"benchmark child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per point; the median is kept")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true", help="let vLLM torch.compile (default: eager)")
    parser.add_argument("--model", help="checkpoint dir (default: a mid-size random checkpoint, built once)")
    parser.add_argument(
        "--host-ops", default="auto", choices=["auto", "off"], help="VLLM_NKI_MOE_HOST_OPS for our class (default auto)"
    )
    parser.add_argument(
        "--arch", default="qwen3_moe", choices=["qwen3_moe", "qwen3", "llama"], help="checkpoint architecture"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from vllm_nki_moe.tools.tiny_model import make_tiny_model

    sizes = MID_SIZE if args.arch == "qwen3_moe" else {k: v for k, v in MID_SIZE.items() if k not in MOE_ONLY}
    model = Path(args.model) if args.model else make_tiny_model(Path(tempfile.mkdtemp()) / "mid", sizes, arch=args.arch)
    print(
        f"checkpoint: {model} ({'given' if args.model else args.arch + ' ' + json.dumps(sizes)}), dtype {args.dtype}, "
        f"{args.new_tokens} new tokens/request, median of {args.repeats}, "
        f"{'torch.compile' if args.compile else 'eager'}, {os.cpu_count()} CPUs"
    )
    print(f"load average (1 min) before: {os.getloadavg()[0]:.2f}")
    print(f"{'batch':>5} | {'vllm_nki_moe tok/s':>18} | {'ops':>9} | {'vLLM own tok/s':>14} | {'ratio':>5}")
    for batch in (int(b) for b in args.batches.split(",")):
        ours = run_child(model, batch, ours=True, args=args)
        theirs = run_child(model, batch, ours=False, args=args)
        assert ours["class"].startswith("vllm_nki_moe"), ours["class"]
        assert theirs["class"].startswith("vllm.model_executor"), theirs["class"]
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        print(
            f"{batch:>5} | {ours['tokens_per_s']:>18.1f} | {ours['ops']:>9} | {theirs['tokens_per_s']:>14.1f} | "
            f"{ratio:>5.2f}"
        )
    print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
