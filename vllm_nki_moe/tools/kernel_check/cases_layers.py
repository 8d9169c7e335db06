"""Kernel-check case of ``kernels/decoder_layers.py``: a decode step's FP8 decoder layers, with their all-reduces,
in one launch, where the model's ``decoder_layers_fp8`` op runs it (``layers_kernel_applies``).

Where an FP8 step counts it, the case runs every layer of the model (``shapes.layers``), as the step does, so its
time includes the one launch's start and end once; elsewhere (a bf16 checkpoint's check) two layers. Every layer
reads the same weight tensors (one layer's, built by the attention and MoE block cases): the emulator maps a tensor
passed twice to one buffer, and the cost counts every layer's reads. Each layer has its own KV cache. The
all-reduces are costed over ``shapes.tp`` ranks (``emulator.solo_rank``), the values being this rank's alone; the
oracle is the per-half kernels in sequence (``_halves_in_sequence``).
"""

from __future__ import annotations

from dataclasses import replace

from nki_emulator import install

install()  # `import nki` in the kernels: the emulator unless the real package imports (then a no-op)

from vllm_nki_moe.kernels import decoder_layers  # noqa: E402 - after install()
from vllm_nki_moe.kernels.attention_block import attention_block_decode_fp8 as attention_kernel  # noqa: E402
from vllm_nki_moe.kernels.moe_fp8 import moe_block_decode_fp8 as moe_kernel  # noqa: E402
from vllm_nki_moe.tools.kernel_check.cases_attention import _block_case, layers_kernel_applies  # noqa: E402
from vllm_nki_moe.tools.kernel_check.cases_moe import _fp8_block_case  # noqa: E402
from vllm_nki_moe.tools.kernel_check.registry import KernelCase  # noqa: E402
from vllm_nki_moe.tools.kernel_check.shapes import KernelShapes  # noqa: E402

UNCOUNTED_LAYERS = 2  # layers of the case where no step counts it (a bf16 checkpoint's check lists it)


def _halves_in_sequence(*args, grid: int):
    """The oracle of this case: the two fused kernels of each layer (launch ``grid``, the case's) run one after the
    other in the emulator, each
    half's output fed to the next (this rank alone: under ``solo_rank`` the other ranks add zeros). The layers
    kernel must equal it bit for bit (the same arithmetic), which any number of layers keeps checkable; the torch
    reference of 48 bf16 layers is not an oracle here, since a routing near-tie flips on one rounding and the
    trajectories part (the halves' own cases check them against torch; tests/kernels/test_decoder_layers.py the
    kernel against ``decoder_layers_decode_fp8_ref`` over 2 layers and 3 ranks)."""
    from nki_emulator import run

    hidden, residual, *rest = args
    lists, (positions, cos_sin, slots, tables, lens, eps, scale, top_k, norm, _) = rest[:15], rest[15:]
    k_caches, v_caches = list(lists[13]), list(lists[14])
    attention = attention_kernel[grid] if grid > 1 else attention_kernel
    moe = moe_kernel[grid] if grid > 1 else moe_kernel
    for i in range(len(lists[0])):
        w = [column[i] for column in lists]
        step = (k_caches[i], v_caches[i], slots, tables, lens, eps, scale)
        (a, residual, k_caches[i], v_caches[i]), _ = run(
            attention, hidden, residual, *w[0:5], positions, cos_sin, w[5], w[6], *step
        )
        (hidden, residual), _ = run(moe, a, residual, *w[7:13], eps, top_k, norm)
    return hidden, residual, tuple(k_caches), tuple(v_caches)


def _layers_case(s: KernelShapes, T: int) -> KernelCase:
    attention = _block_case(s, T, s.context_len, fp8=True)
    item = s.torch_dtype.itemsize
    moe = _fp8_block_case(s, T, 2 * T * s.hidden * item, None, True)
    counted = layers_kernel_applies(s, T)
    # every layer where a step counts it (its one start and end then weigh as in the step); else two, to check it
    L = s.layers if counted else min(s.layers, UNCOUNTED_LAYERS)

    def inputs(rng) -> tuple:
        a = attention.build_inputs(rng)
        m = moe.build_inputs(rng)
        layer = (a[2], *a[3:5], a[5], a[6], *a[9:11], m[2], m[3], *m[4:8])  # one layer's weights, shared
        caches = [(a[11].clone(), a[12].clone()) for _ in range(L)]
        lists = [(w,) * L for w in layer] + [tuple(k for k, _ in caches), tuple(v for _, v in caches)]
        step = (a[7], a[8], *a[13:16], s.rms_eps, a[17])  # positions, cos/sin, slots, tables, lens, eps, scale
        return (a[0], a[1], *lists, *step, s.top_k, s.norm_topk_prob, s.tp)

    # each half's minimum without the activations the halves hand each other (they stay on chip): 4 T x H per half
    between = 4 * T * s.hidden * item
    return KernelCase(
        kernel="decoder_layers_decode_fp8",
        shapes=f"L={L} B={T} ctx={s.context_len} H={s.hidden} E={s.experts} k={s.top_k} fp8 TP={s.tp}",
        build_inputs=inputs,
        kernel_fn=decoder_layers.decoder_layers_decode_fp8,
        reference=_halves_in_sequence,
        tolerance=attention.tolerance,
        min_hbm_bytes=L * (attention.min_hbm_bytes + moe.min_hbm_bytes - 2 * between) + between,
        calls_per_layer=0,
        calls_per_step=1 if counted else 0,
        lnc_grid=True,  # each half's grid (kernels/decoder_layers.py, "Grid")
        phase="decode",
        covers=("qkv_proj", "o_proj", "all_reduce"),
        ranks=s.tp,
        reference_grid=True,
    )


def cases(shapes: KernelShapes, tokens: int) -> list[KernelCase]:
    """The case where an FP8 checkpoint of these shapes would run the kernel; counted in FP8 steps only."""
    if not layers_kernel_applies(replace(shapes, fp8=True), tokens):
        return []
    return [_layers_case(shapes, tokens)]
