"""``vllm-nki-moe parity``: our model served by vLLM (CPU or Neuron, any TP) against Hugging Face on the host CPU.

vLLM runs in a fresh process (``tools.vllm_greedy``) with our plugin on the chosen platform; Hugging Face
transformers runs the same checkpoint greedily on this host's CPU in the same dtype. The report gives, per prompt,
the first new token where the two differ. Exit status: 0 every prompt matches, 1 a mismatch, 2 a run could not start.
"""

from __future__ import annotations

import argparse

from vllm_nki_moe import envs
from vllm_nki_moe.tools.generate import first_mismatch

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Mixture-of-experts models route each token to",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory or Hugging Face model id")
    parser.add_argument(
        "--device", choices=("cpu", "neuron"), default="cpu", help="platform vLLM serves on (default cpu)"
    )
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM's tensor-parallel degree (default 1)")
    parser.add_argument(
        "--kernels", choices=envs.KERNEL_BACKENDS, help="op backend (default: the platform's, as vllm serve picks it)"
    )
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="both sides' dtype")
    parser.add_argument("--prompt", action="append", help="prompt text (repeat; default: three built-in prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per prompt (default 16)")
    parser.add_argument("--max-model-len", type=int, default=512, help="vLLM's max_model_len (default 512)")
    parser.add_argument("--compiled", action="store_true", help="vLLM's default compiled mode instead of enforce_eager")


def _check(args: argparse.Namespace) -> str | None:
    if args.tensor_parallel_size < 1:
        return f"--tensor-parallel-size={args.tensor_parallel_size}; must be a positive integer"
    if args.max_new_tokens < 1:
        return f"--max-new-tokens={args.max_new_tokens}; must be a positive integer"
    return None


def run_parity(args: argparse.Namespace) -> int:
    from vllm_nki_moe.tools.generate import hf_greedy
    from vllm_nki_moe.tools.vllm_greedy import GreedySpec, VllmRunError, run_vllm_greedy

    problem = _check(args)
    if problem:
        print(f"error: parity: {problem}")
        return 2
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    spec = GreedySpec(
        model=args.model,
        prompts=prompts,
        max_tokens=args.max_new_tokens,
        device=args.device,
        kernels=args.kernels,
        dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_model_len,
        enforce_eager=not args.compiled,
    )
    try:
        ours = run_vllm_greedy(spec)
    except VllmRunError as err:
        print(f"error: parity: {err}")
        return 2
    reference = hf_greedy(args.model, prompts, args.max_new_tokens, dtype=args.dtype)
    print(
        f"parity: {args.model}, {args.dtype}: vLLM on {args.device} TP={args.tensor_parallel_size} "
        f"(model {ours['model_class'] or 'in a worker process'}, kernels {ours['opset'] or args.kernels or 'default'})"
        f" vs Hugging Face transformers on the host CPU, {len(prompts)} prompts x {args.max_new_tokens} new tokens"
    )
    matches = 0
    for i, (prompt, got, want) in enumerate(zip(prompts, ours["tokens"], reference)):
        at = first_mismatch(got, want)
        if at is None:
            matches += 1
            print(f"[{i}] {prompt!r}: match ({len(want)} tokens)")
        else:
            mine = got[at] if at < len(got) else None
            theirs = want[at] if at < len(want) else None
            print(f"[{i}] {prompt!r}: MISMATCH at new token {at}: vLLM {mine}, Hugging Face {theirs}")
    print(f"parity: {matches} of {len(prompts)} prompts match")
    return 0 if matches == len(prompts) else 1
