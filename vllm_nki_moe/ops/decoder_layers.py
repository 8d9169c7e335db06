"""A decode step's decoder layers as one op: for each layer the FP8 attention half, the tensor-parallel all-reduce of
its output, the FP8 MoE half and its all-reduce.

``decoder_layers_fp8(hidden, residual, input_norms, qkv_weights, qkv_scales_inv, q_norms, k_norms, o_weights,
o_scales_inv, post_norms, gate_weights, w13s, w13_scales_inv, w2s, w2_scales_inv, k_caches, v_caches, positions,
cos_sin_cache, slot_mapping, block_tables, context_lens, eps, scale, top_k, renormalize) -> (out, residual)``: the
per-layer arguments are lists of one tensor per layer, in the model's layouts (as ``attention_block_fp8`` and
``moe_block_fp8`` take them); ``out`` is the last layer's all-reduced MoE output and ``residual`` its residual.

Under a kernel backend, where every layer's two fused halves apply, ``kernels/decoder_layers.py`` runs all the layers
in one launch with the all-reduces inside it (``nki.collectives``); elsewhere the op is its sequence: per layer
``attention_block_fp8``, vLLM's ``tensor_model_parallel_all_reduce``, ``moe_block_fp8``, the all-reduce again.
"""

from __future__ import annotations

from typing import Callable

import torch

from vllm_nki_moe.ops import fp8
from vllm_nki_moe.ops.attention_block import attention_block_reason
from vllm_nki_moe.ops.kernel_call import call_kernel, launch_grid, load_kernels, real_nki_available
from vllm_nki_moe.ops.spec import KernelImpl, OpSpec


def tensor_parallel_size() -> int:
    """vLLM's tensor-parallel world size; 1 outside a vLLM process (tools, tests)."""
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def all_reduce_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """vLLM's all-reduce over the tensor-parallel ranks (what the layers do after o_proj and the experts)."""
    if tensor_parallel_size() == 1:
        return x
    from vllm.distributed import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(x)


def decoder_layers_fp8_sequence(impls: dict[str, Callable]) -> Callable:
    attention, moe = impls["attention_block_fp8"], impls["moe_block_fp8"]

    def decoder_layers_fp8(
        hidden: torch.Tensor,
        residual: torch.Tensor,
        input_norms: list[torch.Tensor],
        qkv_weights: list[torch.Tensor],
        qkv_scales_inv: list[torch.Tensor],
        q_norms: list[torch.Tensor],
        k_norms: list[torch.Tensor],
        o_weights: list[torch.Tensor],
        o_scales_inv: list[torch.Tensor],
        post_norms: list[torch.Tensor],
        gate_weights: list[torch.Tensor],
        w13s: list[torch.Tensor],
        w13_scales_inv: list[torch.Tensor],
        w2s: list[torch.Tensor],
        w2_scales_inv: list[torch.Tensor],
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        eps: float,
        scale: float,
        top_k: int,
        renormalize: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for i in range(len(input_norms)):
            out, residual = attention(
                hidden,
                residual,
                input_norms[i],
                eps,
                qkv_weights[i],
                qkv_scales_inv[i],
                q_norms[i],
                k_norms[i],
                positions,
                cos_sin_cache,
                o_weights[i],
                o_scales_inv[i],
                k_caches[i],
                v_caches[i],
                slot_mapping,
                block_tables,
                context_lens,
                scale,
            )
            hidden = all_reduce_over_ranks(out)
            out, residual = moe(
                hidden,
                residual,
                post_norms[i],
                eps,
                gate_weights[i],
                w13s[i],
                w13_scales_inv[i],
                w2s[i],
                w2_scales_inv[i],
                top_k,
                renormalize,
            )
            hidden = all_reduce_over_ranks(out)
        return hidden, residual

    return decoder_layers_fp8


# ---------------------------------------------------------------------------------------------------------------------
# the kernel binding (kernels/decoder_layers.py)


def _supports(
    hidden,
    residual,
    input_norms,
    qkv_weights,
    qkv_scales_inv,
    q_norms,
    k_norms,
    o_weights,
    o_scales_inv,
    post_norms,
    gate_weights,
    w13s,
    w13_scales_inv,
    w2s,
    w2_scales_inv,
    k_caches,
    v_caches,
    positions,
    cos_sin_cache,
    slot_mapping,
    block_tables,
    context_lens,
    eps,
    scale,
    top_k,
    renormalize,
) -> str | None:
    """Where the one-launch kernel applies: every layer's fused attention and MoE halves apply; under the emulator,
    one tensor-parallel rank (its collectives meet ranks run in one process, ``emulator.run_ranks``, and vLLM's ranks
    are processes). Elsewhere the op runs its sequence (not an error)."""
    if not input_norms:
        return "no layers"
    ranks = tensor_parallel_size()
    if ranks > 1 and not real_nki_available():  # the emulator runs the kernel
        return f"tensor-parallel size {ranks}: the emulator's in-kernel all-reduce meets ranks of one process only"
    for i in range(len(input_norms)):
        heads = o_weights[i].shape[1] // k_caches[i].shape[-1]
        reason = attention_block_reason(hidden, residual, k_caches[i], heads, fp8=True)
        moe = (post_norms[i], eps, gate_weights[i], w13s[i], w13_scales_inv[i], w2s[i], w2_scales_inv[i], top_k)
        reason = reason or fp8.moe_block_fp8_supports(hidden, residual, *moe, renormalize)
        if reason:
            return f"layer {i}: {reason}"
    return None


def _kernel(
    backend: str,
    hidden,
    residual,
    input_norms,
    qkv_weights,
    qkv_scales_inv,
    q_norms,
    k_norms,
    o_weights,
    o_scales_inv,
    post_norms,
    gate_weights,
    w13s,
    w13_scales_inv,
    w2s,
    w2_scales_inv,
    k_caches,
    v_caches,
    positions,
    cos_sin_cache,
    slot_mapping,
    block_tables,
    context_lens,
    eps,
    scale,
    top_k,
    renormalize,
):
    L = len(input_norms)
    qkv = [fp8.linear_fp8_kernel_weights(qkv_weights[i], qkv_scales_inv[i]) for i in range(L)]
    o = [fp8.linear_fp8_kernel_weights(o_weights[i], o_scales_inv[i]) for i in range(L)]
    moe = [
        fp8.moe_block_fp8_kernel_weights(gate_weights[i], w13s[i], w13_scales_inv[i], w2s[i], w2_scales_inv[i])
        for i in range(L)
    ]
    ints = [t.to(torch.int32).contiguous() for t in (positions, slot_mapping, block_tables, context_lens)]
    # tuples, not lists: NKI 0.3 on takes no list kernel arguments (migration guide, "Replace list kernel arguments")
    out, r, k_new, v_new = call_kernel(
        backend,
        load_kernels("decoder_layers").decoder_layers_decode_fp8,
        hidden.contiguous(),
        residual.contiguous(),
        tuple(w.contiguous() for w in input_norms),
        tuple(w for w, _ in qkv),
        tuple(s for _, s in qkv),
        tuple(w.contiguous() for w in q_norms),
        tuple(w.contiguous() for w in k_norms),
        tuple(w for w, _ in o),
        tuple(s for _, s in o),
        tuple(w.contiguous() for w in post_norms),
        *(tuple(m[j] for m in moe) for j in range(5)),
        tuple(k_caches),
        tuple(v_caches),
        ints[0],
        cos_sin_cache.float().contiguous(),
        *ints[1:],
        float(eps),
        float(scale),
        int(top_k),
        bool(renormalize),
        tensor_parallel_size(),
        grid=launch_grid(backend),  # each half's grid (kernels/decoder_layers.py, "Grid")
    )
    for caches, returned in ((k_caches, k_new), (v_caches, v_new)):
        for cache, new in zip(caches, returned):
            if new.data_ptr() != cache.data_ptr():  # the emulator returns copies
                cache.copy_(new)
    return out, r


SPECS = (
    OpSpec(
        "decoder_layers_fp8",
        kernel=KernelImpl(_kernel, _supports),
        compose=decoder_layers_fp8_sequence,
    ),
)
