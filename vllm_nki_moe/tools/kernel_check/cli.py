"""Arguments and handler of ``vllm-nki-moe kernels check|bench`` (wired into ``vllm_nki_moe.tools.cli``)."""

from __future__ import annotations

import argparse
import sys

BACKENDS = ("emulator", "nki", "nki-sim")
DEFAULT_TOKENS = "1,5,131"  # one token, a small decode batch, one full 128-token tile plus a ragged tail


def _tokens(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens={text!r}; must be comma-separated positive integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--tokens={text!r}; must be comma-separated positive integers")
    return values


def add_kernels_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kernels_command", required=True)
    check = sub.add_parser("check", help="run every kernel at the model's per-rank shapes against its reference")
    bench = sub.add_parser("bench", help="cost-model time of a decode step (batch 1/8/32) and a 512-token prefill")
    for p in (check, bench):
        model = p.add_mutually_exclusive_group()
        model.add_argument(
            "--config",
            help="Hugging Face config.json: Qwen3-MoE, Qwen3 or Llama (default: Qwen3-30B-A3B's values)",
        )
        model.add_argument(
            "--model", help="a checkpoint directory or Hugging Face model id whose config.json gives the shapes"
        )
        p.add_argument(
            "--tp",
            "--tensor-parallel-size",
            dest="tp",
            type=int,
            default=4,
            help="tensor-parallel degree the shapes are split by (default 4)",
        )
        p.add_argument(
            "--kernels",
            choices=BACKENDS,
            default="emulator",
            help="emulator: our NumPy NKI emulator (default); nki: AWS's nki on the Neuron device; nki-sim: AWS's "
            "nki.simulate on this CPU",
        )
        p.add_argument(
            "--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="activation dtype (default bfloat16)"
        )
        p.add_argument(
            "--lnc",
            type=int,
            choices=(1, 2),
            default=None,
            help="physical cores per logical core: kernels written for a grid launch that many programs "
            "(default: check 1; bench the target's, trn2 2, trn1 1)",
        )
        p.add_argument(
            "--target",
            choices=("trn2", "trn1"),
            default="trn2",
            help="hardware the emulator checks capacity for and the cost model describes (default trn2)",
        )
    check.add_argument("--tokens", type=_tokens, default=_tokens(DEFAULT_TOKENS), help=f"default {DEFAULT_TOKENS}")
    check.add_argument("--only", help="kernel names (comma-separated; substrings match) to run")
    check.add_argument(
        "--nki-version",
        help="NKI release whose language rules and names the emulator imitates (0.3: Neuron SDK 2.29, the contest's "
        "harness; 0.6: SDK 2.32, the serving stack); a kernel that release's compiler rejects fails with the rule",
    )


def _backend_ready(backend: str, nki_version: str | None = None) -> str | None:
    if backend == "emulator":
        from nki_emulator import install

        try:
            install(nki_version=nki_version)
        except ValueError as err:  # an unknown release
            return str(err)
        return None
    if nki_version is not None:
        return "--nki-version selects the emulator's language rules; with --kernels nki the installed nki decides"

    from vllm_nki_moe.ops.kernel_call import real_nki_available

    if not real_nki_available():
        return f"kernels={backend} but AWS's `nki` package is not importable here; use --kernels emulator"
    if backend == "nki":
        from vllm_nki_moe.platforms import devices

        if not devices.find_neuron_devices():
            return (
                f"kernels=nki runs each kernel on the Neuron device, and none is visible (looked for "
                f"{devices.where_we_looked()}); --kernels nki-sim runs AWS's simulator on this CPU"
            )
    return None


def run_kernels_command(args: argparse.Namespace) -> int:
    nki_version = getattr(args, "nki_version", None)
    try:
        return _run(args, nki_version)
    finally:
        if nki_version is not None and args.kernels == "emulator":  # back to the default release (in-process callers)
            from nki_emulator.install import set_nki_version

            set_nki_version(None)


def _run(args: argparse.Namespace, nki_version: str | None) -> int:
    from nki_emulator import targets

    target = targets.get(args.target)
    if args.lnc is None:
        args.lnc = 1 if args.kernels_command == "check" else target.logical_core_size
    if args.lnc > target.logical_core_size:
        print(
            f"error: --lnc {args.lnc} with --target {target.name}: {target.name} ({target.core}) has logical cores of "
            f"at most {target.logical_core_size} physical core(s)",
            file=sys.stderr,
        )
        return 2
    with targets.use(target.name):
        return _run_on_target(args, nki_version)


def _run_on_target(args: argparse.Namespace, nki_version: str | None) -> int:
    from vllm_nki_moe.tools.kernel_check.shapes import ShapesError, kernel_shapes, model_config_path

    problem = _backend_ready(args.kernels, nki_version)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        config = model_config_path(args.model) if args.model else args.config
        shapes = kernel_shapes(config, args.tp, args.dtype)
    except ShapesError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.kernels_command == "bench":
        from vllm_nki_moe.tools.kernel_check.bench import bench, format_bench

        steps = bench(shapes, args.kernels, lnc=args.lnc)
        print(format_bench(shapes, steps))
        return 1 if any(st.failed for st in steps) else 0

    from vllm_nki_moe.tools.kernel_check.registry import all_cases
    from vllm_nki_moe.tools.kernel_check.runner import format_rows, run_cases

    release = f"; NKI {nki_version} rules" if nki_version else ""
    print(f"kernels check: {shapes.describe()}; kernels={args.kernels}{release}; LNC={args.lnc}; target={args.target}")
    rows = []
    for tokens in args.tokens:
        cases = all_cases(shapes, tokens, args.only)
        rows.extend(run_cases(cases, args.kernels, lnc=args.lnc))
    if not rows:
        print(f"error: no kernel case matches --only={args.only!r}", file=sys.stderr)
        return 2
    print(format_rows(rows))
    failed = [r for r in rows if not r.passed]
    print(f"{len(rows) - len(failed)} of {len(rows)} passed")
    return 1 if failed else 0
