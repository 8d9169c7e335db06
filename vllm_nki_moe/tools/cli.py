"""The vllm-nki-moe command: developer tools around the plugin (serving itself is `vllm serve`)."""

from __future__ import annotations

import argparse
import sys


def _make_tiny_model(args: argparse.Namespace) -> int:
    from vllm_nki_moe.tools.tiny_model import ARCHS, TinyModelConfigError, load_config_overrides, make_tiny_model

    try:
        overrides = load_config_overrides(args.config, args.arch) if args.config else None
        out = make_tiny_model(args.dir, overrides, seed=args.seed, arch=args.arch, fp8=args.fp8)
    except TinyModelConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kind = "FP8 (128 x 128 block scales) " if args.fp8 else ""
    print(f"wrote a random-weight {kind}{ARCHS[args.arch][1]} checkpoint to {out}")
    return 0


def _kernels(args: argparse.Namespace) -> int:
    from vllm_nki_moe.tools.kernel_check.cli import run_kernels_command

    return run_kernels_command(args)


def _export_contest(args: argparse.Namespace) -> int:
    from vllm_nki_moe.tools.contest_export import ExportError, export_contest
    from vllm_nki_moe.tools.contest_report import build_report, format_report
    from vllm_nki_moe.tools.kernel_check.shapes import ShapesError, kernel_shapes

    try:
        shapes = kernel_shapes(None, args.tp) if args.report else None  # checked before anything is written
    except ShapesError as err:
        print(f"error: export-contest --report --tp {args.tp}: {err}", file=sys.stderr)
        return 2
    try:
        result = export_contest(args.out, only=_names(args.only), skip=_names(args.skip))
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {result.path}: kernels/{{{', '.join(result.kernel_files)}}}.py embedded")
    for hook, reason in result.hooks.items():
        print(f"  {hook}: {'wired' if reason is None else 'not wired, ' + reason}")
    if shapes is not None:
        print(format_report(build_report(result.hooks, shapes), shapes))
    return 0


def _names(value: str | None) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.split(",") if name.strip()) if value else ()


def _generate(args: argparse.Namespace) -> int:
    from vllm_nki_moe.tools.generate import run_generate

    return run_generate(args)


def _parity(args: argparse.Namespace) -> int:
    from vllm_nki_moe.tools.parity import run_parity

    return run_parity(args)


def _mac_ratio(args: argparse.Namespace) -> int:
    from vllm_nki_moe.tools.mac_ratio import run_mac_ratio

    return run_mac_ratio(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-nki-moe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser(
        "make-tiny-model", help="write a random-weight checkpoint (Qwen3-MoE, Qwen3, Llama) vLLM and transformers load"
    )
    tiny.add_argument("dir", help="output directory (created if missing)")
    tiny.add_argument(
        "--arch",
        choices=("qwen3_moe", "qwen3", "llama"),
        default="qwen3_moe",
        help="architecture: Qwen3-MoE (default), Qwen3 dense or Llama 3 (Llama 3.2 1B's tensor names and fields)",
    )
    tiny.add_argument("--config", help="JSON file of the architecture's transformers config fields overriding defaults")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.add_argument(
        "--fp8",
        action="store_true",
        help="Qwen's FP8 checkpoint format: projections and experts float8_e4m3fn with fp32 128 x 128 block scales "
        "(weight_scale_inv) and quantization_config; embeddings, norms, router and LM head unquantized",
    )
    tiny.set_defaults(handler=_make_tiny_model)

    kernels = sub.add_parser("kernels", help="check NKI kernels against their references; cost-model benchmark")
    from vllm_nki_moe.tools.kernel_check.cli import add_kernels_arguments

    add_kernels_arguments(kernels)
    kernels.set_defaults(handler=_kernels)

    contest = sub.add_parser(
        "export-contest", help="write our kernels as one drop-in qwen_with_nki.py for aws-neuron/nki-moe's main.py"
    )
    contest.add_argument("out", help="the module to write, e.g. qwen_with_nki.py")
    contest.add_argument(
        "--report",
        action="store_true",
        help="also print per kernel family wired or not and why, the estimated rho (NKI share of MACs, the "
        "harness's rule) and the eligibility rule it meets (Qwen3-30B-A3B shapes)",
    )
    contest.add_argument("--tp", type=int, default=4, help="TP degree of the report's shapes (default 4)")
    from vllm_nki_moe.tools.contest_export import HOOK_NAMES

    which = contest.add_mutually_exclusive_group()
    which.add_argument(
        "--only",
        metavar="HOOKS",
        help=f"wire only these hooks, comma-separated (of {','.join(HOOK_NAMES)}); NxDI's modules run elsewhere",
    )
    which.add_argument(
        "--skip", metavar="HOOKS", help="leave these hooks (comma-separated) to NxDI's modules, e.g. to bisect accuracy"
    )
    contest.set_defaults(handler=_export_contest)

    gen = sub.add_parser(
        "generate", help="greedy prefill + decode over our Qwen3-MoE modules with a paged KV cache (no vLLM engine)"
    )
    from vllm_nki_moe.tools.generate import add_arguments as add_generate_arguments

    add_generate_arguments(gen)
    gen.set_defaults(handler=_generate)

    parity = sub.add_parser(
        "parity", help="our model served by vLLM (cpu or neuron, any TP) vs Hugging Face greedy on the host CPU"
    )
    from vllm_nki_moe.tools.parity import add_arguments as add_parity_arguments

    add_parity_arguments(parity)
    parity.set_defaults(handler=_parity)

    mac = sub.add_parser("mac-ratio", help="share of a step's MACs in NKI kernels, counted as the contest counts it")
    from vllm_nki_moe.tools.mac_ratio import add_arguments as add_mac_ratio_arguments

    add_mac_ratio_arguments(mac)
    mac.set_defaults(handler=_mac_ratio)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
