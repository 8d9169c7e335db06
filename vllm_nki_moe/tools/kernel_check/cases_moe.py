"""Kernel-check cases for ``kernels/moe_decode.py`` and ``kernels/moe_prefill.py``: the routed experts per MoE layer.

For ``tokens`` T the model's ``moe_experts`` runs the decode kernel while ``ops.moe.use_decode`` says so (few
tokens) and the prefill kernel otherwise; those cases count once per layer in ``kernels bench``. Where
``ops.moe.fused_block_applies`` (batch-1 decode at Qwen3-30B-A3B sizes), the model's ``moe_block`` op runs the
fused ``moe_block_decode`` instead (post-attention norm, router and experts in one kernel): then that case counts
once per layer, and the experts, router and one of the two norms per layer count zero (``cases_norms``,
``cases_router`` ask the same function).

``moe_decode_fp8``, the fused ``moe_block_decode_fp8`` (``kernels/moe_fp8.py``) and the expert-grouped
``moe_prefill_fp8`` are checked at every shape; they count in the step only when the shapes say the experts are FP8
(``KernelShapes.fp8``, the FP8 step ``kernels bench`` prints beside the bf16 one): the fused FP8 block where the fused
block applies (decode; it carries norm and router), else the FP8 decode or grouped kernel as ``ops.fp8.use_fp8_decode``
picks (norm and router then run as their own kernels).

Routing is fixed per case (seeded here, uniform over experts, distinct experts per token), so ``min_hbm_bytes`` is
exact: the weights of the distinct experts the tokens select, read once, plus activations in and out and the routing
data. The decode kernel reads one expert per (token, slot), so duplicates among a batch's slots are charged to it.

Figures: ``python -m vllm_nki_moe.tools.kernel_check.cases_moe``
prints the batch-1 roofline table at Qwen3-30B-A3B TP=4;
``--select`` prints the decode-vs-prefill estimates behind ``ops.moe.use_decode``.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
import torch

from nki_emulator import install

install()  # `import nki` in the kernels: the emulator unless the real package imports (then a no-op)

from vllm_nki_moe.kernels import moe_block, moe_common, moe_decode, moe_fp8, moe_prefill, moe_prefill_fp8  # noqa: E402
from vllm_nki_moe.kernels.limits import PMAX, TOPK8  # noqa: E402
from vllm_nki_moe.ops.fp8 import use_fp8_decode  # noqa: E402
from vllm_nki_moe.ops.moe import bucket_block_size, fused_block_applies, use_decode  # noqa: E402
from vllm_nki_moe.tools.kernel_check.cases_attention import layers_kernel_applies  # noqa: E402
from vllm_nki_moe.tools.kernel_check.registry import KernelCase  # noqa: E402
from vllm_nki_moe.tools.kernel_check.shapes import KernelShapes, kernel_shapes  # noqa: E402

_DT_NAMES = {"bfloat16": "bf16", "float32": "fp32"}
ROUTING_SEED = 1  # routing (expert ids, weights) of every case; activations come from the runner's rng
WEIGHT_SEED = 2  # expert weights: generated once per shape and reused by the module's cases


def _split_reason(n: int, what: str) -> str | None:
    tiles = -(-n // PMAX)
    return None if n % tiles == 0 else f"{what}={n}; must split into ceil({what}/{PMAX})={tiles} equal partition tiles"


@functools.lru_cache(maxsize=1)
def _expert_weights(E: int, H: int, inter: int, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel-layout expert weights, one copy per shape (Qwen3-30B-A3B TP=4 is 300 MB of bf16)."""
    rng = np.random.default_rng(WEIGHT_SEED)
    dt = getattr(torch, dtype)
    w13 = torch.from_numpy(rng.standard_normal((E, 2 * inter, H), dtype=np.float32) * H**-0.5).to(dt)
    w2 = torch.from_numpy(rng.standard_normal((E, H, inter), dtype=np.float32) * inter**-0.5).to(dt)
    return moe_common.experts_kernel_layout(w13, w2)


def _routing(T: int, E: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(ROUTING_SEED)
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32)
    w = rng.random((T, K), dtype=np.float32) + 0.1
    return torch.from_numpy(w / w.sum(-1, keepdims=True)), torch.from_numpy(ids)


@functools.lru_cache(maxsize=1)
def _fp8_expert_weights(E: int, H: int, inter: int) -> tuple[torch.Tensor, ...]:
    """FP8 experts as the model holds them (``ops.fp8.quantize_experts``), in ``moe_fp8``'s kernel layout; one copy
    per shape."""
    from vllm_nki_moe.ops import fp8

    g = torch.Generator().manual_seed(WEIGHT_SEED)
    w13 = torch.randn(E, 2 * inter, H, generator=g) * H**-0.5
    w2 = torch.randn(E, H, inter, generator=g) * inter**-0.5
    return moe_fp8.fp8_experts_kernel_layout(*fp8.quantize_experts(w13, w2))


def fp8_expert_bytes(H: int, inter: int) -> int:
    """HBM bytes of one FP8 expert as the kernels read it: 1 byte per weight of gate, up and down (3 x H x I) and the
    fp32 scales expanded along I (a row of H / 128 per w13 row, a column per w2 column: 3 x I x H / 128)."""
    return 3 * H * inter + 4 * 3 * inter * (H // PMAX)


def _fp8_block_case(s: KernelShapes, T: int, act_bytes: int, unsupported: str | None, fused: bool) -> KernelCase:
    """``moe_block_decode_fp8``: the model's ``moe_block_fp8`` where the fused block applies (an FP8 checkpoint's
    decode)."""
    E, K, H, inter, dt = s.experts, s.top_k, s.hidden, s.moe_intermediate, s.torch_dtype
    expert_bytes = fp8_expert_bytes(H, inter)

    def inputs(rng: np.random.Generator) -> tuple:
        x, res = (torch.from_numpy(rng.standard_normal((T, H), dtype=np.float32)).to(dt) for _ in range(2))
        gamma = torch.from_numpy(1 + 0.1 * rng.standard_normal(H, dtype=np.float32)).to(dt)
        router = torch.from_numpy(rng.standard_normal((E, H), dtype=np.float32) * 4 * H**-0.5).to(dt)
        return (x, res, gamma, router.t(), *_fp8_expert_weights(E, H, inter), s.rms_eps, K, s.norm_topk_prob)

    return KernelCase(
        kernel="moe_block_decode_fp8",
        shapes=f"T={T} H={H} I={inter} E={E} k={K} fp8/{_DT_NAMES[s.dtype]}",
        build_inputs=inputs,
        kernel_fn=moe_fp8.moe_block_decode_fp8,
        reference=moe_fp8.moe_block_decode_fp8_ref,
        tolerance="bfloat16_matmul" if s.dtype == "bfloat16" else "float32_matmul",
        min_hbm_bytes=min(T * K, E) * expert_bytes + 2 * act_bytes + (E * H + H) * dt.itemsize,
        calls_per_layer=1 if s.fp8 and fused and not layers_kernel_applies(s, T) else 0,  # else in decoder_layers
        lnc_grid=True,  # the slots split over the programs (kernels/moe_fp8.py, "Grid")
        phase="decode",
        unsupported=unsupported,
    )


def _fp8_decode_case(s: KernelShapes, T: int, weights, ids, distinct: int, act_bytes: int) -> KernelCase:
    E, K, H, inter = s.experts, s.top_k, s.hidden, s.moe_intermediate
    unsupported = _fp8_unsupported(H, inter)
    expert_bytes = fp8_expert_bytes(H, inter)

    def inputs(rng: np.random.Generator) -> tuple:
        x = torch.from_numpy(rng.standard_normal((T, H), dtype=np.float32)).to(s.torch_dtype)
        return (x, *_fp8_expert_weights(E, H, inter), weights, ids)

    return KernelCase(
        kernel="moe_decode_fp8",
        shapes=f"T={T} H={H} I={inter} E={E} k={K} fp8/{_DT_NAMES[s.dtype]}",
        build_inputs=inputs,
        kernel_fn=moe_fp8.moe_decode_fp8,
        reference=moe_fp8.moe_decode_fp8_ref,
        tolerance="bfloat16_matmul" if s.dtype == "bfloat16" else "float32_matmul",
        min_hbm_bytes=distinct * expert_bytes + act_bytes + T * K * 8,
        # the FP8 op runs it where use_fp8_decode says so and the fused FP8 block does not apply
        calls_per_layer=1 if s.fp8 and use_fp8_decode(T, K, E) and not fused_block_applies(T, K, E) else 0,
        lnc_grid=True,  # the slots split over the programs (kernels/moe_fp8.py, "Grid")
        phase="decode",
        unsupported=unsupported,
    )


def cases(shapes: KernelShapes, tokens: int) -> list[KernelCase]:
    s, T, E, K, H, inter = shapes, tokens, shapes.experts, shapes.top_k, shapes.hidden, shapes.moe_intermediate
    if E == 0:  # a dense model: no experts
        return []
    dt = s.torch_dtype
    item = dt.itemsize
    tol = "bfloat16_matmul" if s.dtype == "bfloat16" else "float32_matmul"
    unsupported = _split_reason(H, "H") or _split_reason(inter, "I")
    weights, ids = _routing(T, E, K) if K <= E else (None, None)
    distinct = len(torch.unique(ids)) if ids is not None else 0
    expert_bytes = 3 * H * inter * item
    act_bytes = 2 * T * H * item  # hidden in, out
    dts = _DT_NAMES[s.dtype]

    def experts():
        return _expert_weights(E, H, inter, s.dtype)

    def hidden(rng: np.random.Generator, n: int = 1) -> list[torch.Tensor]:
        return [torch.from_numpy(rng.standard_normal((T, H), dtype=np.float32)).to(dt) for _ in range(n)]

    out: list[KernelCase] = []
    decode = T <= moe_decode.MAX_DECODE_TOKENS and use_decode(T, K, E) and not s.fp8
    fused = fused_block_applies(T, K, E) and not s.fp8  # the model's moe_block runs moe_block_decode
    if T <= moe_decode.MAX_DECODE_TOKENS:

        def decode_inputs(rng: np.random.Generator) -> tuple:
            w13k, w2k = experts()
            return (hidden(rng)[0], w13k, w2k, weights, ids)

        out.append(
            KernelCase(
                kernel="moe_decode",
                shapes=f"T={T} H={H} I={inter} E={E} k={K} {dts}",
                build_inputs=decode_inputs,
                kernel_fn=moe_decode.moe_decode,
                reference=moe_decode.moe_decode_ref,
                tolerance=tol,
                min_hbm_bytes=distinct * expert_bytes + act_bytes + T * K * 8,
                calls_per_layer=1 if decode and not fused else 0,
                lnc_grid=True,  # the slots split over the programs (kernels/moe_decode.py, "Grid")
                phase="decode",
                unsupported=unsupported,
            )
        )
        block_unsupported = unsupported
        if not TOPK8 >= K or not 8 <= E <= moe_block.MAX_ROUTER_EXPERTS:
            block_unsupported = f"E={E}, top_k={K}; the fused block needs 8 <= E <= 512 and top_k <= 8"

        def block_inputs(rng: np.random.Generator) -> tuple:
            w13k, w2k = experts()
            x, res = hidden(rng, 2)
            gamma = torch.from_numpy(1 + 0.1 * rng.standard_normal(H, dtype=np.float32)).to(dt)
            router = torch.from_numpy(rng.standard_normal((E, H), dtype=np.float32) * 4 * H**-0.5).to(dt)
            rw = moe_common.router_kernel_layout(router)
            return (x, res, gamma, rw, w13k, w2k, s.rms_eps, K, s.norm_topk_prob)

        # The router picks the experts here, so the minimum counts T*K experts (distinct for T = 1).
        out.append(
            KernelCase(
                kernel="moe_block_decode",
                shapes=f"T={T} H={H} I={inter} E={E} k={K} {dts}",
                build_inputs=block_inputs,
                kernel_fn=moe_block.moe_block_decode,
                reference=moe_block.moe_block_decode_ref,
                tolerance=tol,
                min_hbm_bytes=min(T * K, E) * expert_bytes + 2 * act_bytes + (E * H + H) * item,
                calls_per_layer=1 if fused else 0,
                lnc_grid=True,  # the experts split over the programs (kernels/moe_block.py, "Grid")
                phase="decode",
                unsupported=block_unsupported,
            )
        )

    if T <= moe_fp8.MAX_DECODE_TOKENS:
        out.append(_fp8_decode_case(s, T, weights, ids, distinct, act_bytes))
        fp8_unsupported = _fp8_decode_case(s, T, weights, ids, distinct, act_bytes).unsupported
        if not TOPK8 >= K or not 8 <= E <= moe_block.MAX_ROUTER_EXPERTS:
            fp8_unsupported = f"E={E}, top_k={K}; the fused block needs 8 <= E <= 512 and top_k <= 8"
        out.append(_fp8_block_case(s, T, act_bytes, fp8_unsupported, fused_block_applies(T, K, E)))

    B = bucket_block_size(T, K, E, inter) if K <= E else PMAX
    NB = moe_prefill.max_blocks(T, K, E, B) if K <= E else 0

    def prefill_inputs(rng: np.random.Generator) -> tuple:
        w13k, w2k = experts()
        meta = moe_prefill.prefill_block_metadata(ids, weights, E, B)
        return (hidden(rng)[0], w13k, w2k, *meta)

    out.append(
        KernelCase(
            kernel="moe_prefill",
            shapes=f"T={T} H={H} I={inter} E={E} k={K} B={B} {dts}",
            build_inputs=prefill_inputs,
            kernel_fn=moe_prefill.moe_prefill,
            reference=moe_prefill.moe_prefill_ref,
            tolerance=tol,
            min_hbm_bytes=distinct * expert_bytes + act_bytes + NB * (B * 8 + 4) + 4,
            calls_per_layer=0 if decode or s.fp8 else 1,
            lnc_grid=True,  # blocks interleaved over the programs (kernels/moe_prefill.py, "Grid")
            phase="prefill" if decode else "any",
            unsupported=unsupported or (f"top_k={K} > E={E}" if K > E else None),
        )
    )
    if K <= E:
        out.append(_fp8_prefill_case(s, T, weights, ids, distinct, act_bytes, B, NB))
    return out


def _fp8_prefill_case(s: KernelShapes, T: int, weights, ids, distinct: int, act_bytes: int, B: int, NB: int):
    """``moe_prefill_fp8``: the FP8 experts where ``ops.fp8.use_fp8_decode`` picks the grouped kernel (the block size
    the bf16 kernel takes at this bucket)."""
    E, K, H, inter = s.experts, s.top_k, s.hidden, s.moe_intermediate
    expert_bytes = fp8_expert_bytes(H, inter)

    def inputs(rng: np.random.Generator) -> tuple:
        x = torch.from_numpy(rng.standard_normal((T, H), dtype=np.float32)).to(s.torch_dtype)
        meta = moe_prefill.prefill_block_metadata(ids, weights, E, B)
        return (x, *_fp8_expert_weights(E, H, inter), *meta)

    return KernelCase(
        kernel="moe_prefill_fp8",
        shapes=f"T={T} H={H} I={inter} E={E} k={K} B={B} fp8/{_DT_NAMES[s.dtype]}",
        build_inputs=inputs,
        kernel_fn=moe_prefill_fp8.moe_prefill_fp8,
        reference=moe_prefill_fp8.moe_prefill_fp8_ref,
        tolerance="bfloat16_matmul" if s.dtype == "bfloat16" else "float32_matmul",
        min_hbm_bytes=distinct * expert_bytes + act_bytes + NB * (B * 8 + 4) + 4,
        calls_per_layer=1 if s.fp8 and not use_fp8_decode(T, K, E) else 0,
        lnc_grid=True,  # blocks interleaved over the programs (kernels/moe_prefill_fp8.py, "Grid")
        phase="any" if not use_fp8_decode(T, K, E) else "prefill",
        unsupported=_fp8_unsupported(H, inter),
    )


def _fp8_unsupported(H: int, inter: int) -> str | None:
    """Why the FP8 expert kernels cannot take these sizes, or None."""
    if H % PMAX:
        return f"H={H}; FP8 experts need a multiple of {PMAX} (one scale block per contraction tile)"
    return _split_reason(inter, "I")


def _estimate(case: KernelCase) -> tuple[float, float]:
    from nki_emulator import run
    from nki_emulator.cost import HBM_BYTES_PER_S_PER_CORE

    _, rep = run(case.kernel_fn, *case.build_inputs(np.random.default_rng(0)))
    return rep.estimated_seconds, case.min_hbm_bytes / HBM_BYTES_PER_S_PER_CORE


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--select", action="store_true", help="decode vs prefill estimates for 1..32 tokens")
    args = p.parse_args(argv)
    shapes = kernel_shapes(None, tp=args.tp)
    print(shapes.describe())
    if args.select:
        print(f"{'T':>4} {'moe_decode us':>14} {'moe_prefill us':>15} {'block':>6}  chosen")
        for T in (1, 2, 4, 8, 16, 32):
            by = {c.kernel: c for c in cases(shapes, T)}
            dec = f"{_estimate(by['moe_decode'])[0] * 1e6:14.1f}" if T <= 16 else f"{'-':>14}"
            pre = _estimate(by["moe_prefill"])[0] * 1e6
            B = bucket_block_size(T, shapes.top_k, shapes.experts, shapes.moe_intermediate)
            chosen = "decode" if use_decode(T, shapes.top_k, shapes.experts) else "prefill"
            print(f"{T:>4} {dec} {pre:15.1f} {B:>6}  {chosen}")
        return
    print(f"{'kernel':18s} {'shapes':40s} {'estimated us':>12} {'roofline us':>12} {'% roofline':>10}")
    for case in cases(shapes, 1):
        est, roof = _estimate(case)
        print(f"{case.kernel:18s} {case.shapes:40s} {est * 1e6:12.2f} {roof * 1e6:12.2f} {100 * roof / est:9.1f}%")


if __name__ == "__main__":
    main()
