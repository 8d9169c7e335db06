"""The ``vllm-nki-moe`` command: developer tools around the plugin (serving itself is ``vllm serve``)."""

from __future__ import annotations

import argparse
import sys


def _make_tiny_model(args: argparse.Namespace) -> int:
    from .tiny_model import TinyModelConfigError, load_config_overrides, make_tiny_model

    try:
        overrides = load_config_overrides(args.config) if args.config else None
        out = make_tiny_model(args.dir, overrides, seed=args.seed)
    except TinyModelConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote a random-weight Qwen3-MoE checkpoint to {out}")
    return 0


def _kernels(args: argparse.Namespace) -> int:
    from .kernel_check.cli import run_kernels_command

    return run_kernels_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-nki-moe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser(
        "make-tiny-model", help="write a random-weight Qwen3-MoE checkpoint that vLLM and transformers load"
    )
    tiny.add_argument("dir", help="output directory (created if missing)")
    tiny.add_argument("--config", help="JSON file of Qwen3MoeConfig fields overriding the defaults")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    tiny.set_defaults(handler=_make_tiny_model)

    kernels = sub.add_parser("kernels", help="check NKI kernels against their references; cost-model benchmark")
    from .kernel_check.cli import add_kernels_arguments

    add_kernels_arguments(kernels)
    kernels.set_defaults(handler=_kernels)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
