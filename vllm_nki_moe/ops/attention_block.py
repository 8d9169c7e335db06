"""The decoder layer's attention half in a decode step as one op: residual add + RMSNorm, q/k/v, q/k norm + RoPE,
``attention_decode`` (writing the new K/V into the paged caches), o. Two composites, one per weight format:

- ``attention_block(hidden, residual, norm_weight, eps, qkv_weight, q_norm_weight, k_norm_weight, positions,
  cos_sin_cache, o_weight, k_cache, v_cache, slot_mapping, block_tables, context_lens, scale)``: projections through
  ``linear`` (weights ``[N, K]`` in the activation dtype);
- ``attention_block_fp8(...)``: the same with ``qkv_scale_inv`` after ``qkv_weight`` and ``o_scale_inv`` after
  ``o_weight``, projections through ``linear_fp8`` (block-scaled FP8).

Both return (this rank's o projection ``[T, H]`` before the all-reduce, the new residual ``[T, H]``); D = head_dim =
``k_cache.shape[-1]``, ``eps`` every RMSNorm's. Under a kernel backend each runs ``kernels/attention_block.py``
where it applies (head_dim 128, up to ``FUSED_MAX_TOKENS`` sequences; ``attention_block_reason``), the ops one by one
elsewhere.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

from vllm_nki_moe.ops import fp8, linear
from vllm_nki_moe.ops.kernel_call import call_kernel, launch_grid, load_kernels
from vllm_nki_moe.ops.spec import KernelImpl, OpSpec

KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def attention_half(
    add_norm: Callable,
    project_qkv: Callable,
    norm_rope: Callable,
    attend: Callable,
    project_o: Callable,
    hidden,
    residual,
    norm_weight,
    eps,
    q_norm_weight,
    k_norm_weight,
    positions,
    cos_sin_cache,
    k_cache,
    v_cache,
    slot_mapping,
    block_tables,
    context_lens,
    scale,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention half op by op (module docstring), ``project_qkv`` / ``project_o`` the two projections."""
    x, residual = add_norm(hidden, residual, norm_weight, eps)
    d = k_cache.shape[-1]
    kv = k_cache.shape[1] * d
    qkv = project_qkv(x)
    q, k, v = qkv.split([qkv.shape[1] - 2 * kv, kv, kv], dim=-1)
    q, k = norm_rope(q, k, q_norm_weight, k_norm_weight, eps, positions, cos_sin_cache, d)
    attn = attend(q, k, v.contiguous(), k_cache, v_cache, slot_mapping, block_tables, context_lens, scale)
    return project_o(attn), residual


def attention_block_sequence(impls: dict[str, Callable]) -> Callable:
    ops = impls["fused_add_rms_norm"], impls["linear"], impls["qk_norm_rope"], impls["attention_decode"]
    add_norm, project, norm_rope, attend = ops

    def attention_block(
        hidden: torch.Tensor,
        residual: torch.Tensor,
        norm_weight: torch.Tensor,
        eps: float,
        qkv_weight: torch.Tensor,
        q_norm_weight: torch.Tensor,
        k_norm_weight: torch.Tensor,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        o_weight: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return attention_half(
            add_norm,
            lambda x: project(x, qkv_weight),
            norm_rope,
            attend,
            lambda x: project(x, o_weight),
            hidden,
            residual,
            norm_weight,
            eps,
            q_norm_weight,
            k_norm_weight,
            positions,
            cos_sin_cache,
            k_cache,
            v_cache,
            slot_mapping,
            block_tables,
            context_lens,
            scale,
        )

    return attention_block


def attention_block_fp8_sequence(impls: dict[str, Callable]) -> Callable:
    ops = impls["fused_add_rms_norm"], impls["linear_fp8"], impls["qk_norm_rope"], impls["attention_decode"]
    add_norm, project, norm_rope, attend = ops

    def attention_block_fp8(
        hidden: torch.Tensor,
        residual: torch.Tensor,
        norm_weight: torch.Tensor,
        eps: float,
        qkv_weight: torch.Tensor,
        qkv_scale_inv: torch.Tensor,
        q_norm_weight: torch.Tensor,
        k_norm_weight: torch.Tensor,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        o_weight: torch.Tensor,
        o_scale_inv: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return attention_half(
            add_norm,
            lambda x: project(x, qkv_weight, qkv_scale_inv),
            norm_rope,
            attend,
            lambda x: project(x, o_weight, o_scale_inv),
            hidden,
            residual,
            norm_weight,
            eps,
            q_norm_weight,
            k_norm_weight,
            positions,
            cos_sin_cache,
            k_cache,
            v_cache,
            slot_mapping,
            block_tables,
            context_lens,
            scale,
        )

    return attention_block_fp8


# ---------------------------------------------------------------------------------------------------------------------
# the kernel bindings (kernels/attention_block.py)


def attention_block_reason(hidden, residual, k_cache, heads: int, fp8: bool) -> str | None:
    """Where the fused attention half applies, either weight format (kernels/attention_block.py, "Limits" and
    ``FUSED_MAX_TOKENS``); None where it does. Elsewhere the composite runs as separate ops (not an error)."""
    kernel, limits = load_kernels("attention_block"), load_kernels("limits")
    if hidden.dtype not in KERNEL_DTYPES or hidden.dim() != 2 or residual.shape != hidden.shape:
        return f"hidden {tuple(hidden.shape)} {hidden.dtype}; the fused block takes [T, H] bfloat16 or float32"
    tokens, H = hidden.shape
    if H % limits.PMAX:
        return f"H={H}; the fused block needs a multiple of {limits.PMAX}"
    if k_cache.dim() != 4 or k_cache.shape[-1] != kernel.HEAD_DIM or k_cache.dtype != hidden.dtype:
        return f"k_cache {tuple(k_cache.shape)} {k_cache.dtype}; the fused block needs head_dim {kernel.HEAD_DIM}"
    most = min(kernel.FUSED_MAX_TOKENS, limits.PSUM_BANK_FMAX // max(H // limits.PMAX, heads))
    if not 1 <= tokens <= most:
        return f"T={tokens}; the fused block runs 1..{most} tokens here (beyond, the ops one by one are faster)"
    decode = load_kernels("attention_decode")
    if 2 * k_cache.shape[2] * kernel.HEAD_DIM * hidden.element_size() > decode.KV_TILE_SBUF_BYTES:
        return f"block_size={k_cache.shape[2]}: K/V block tiles exceed {decode.KV_TILE_SBUF_BYTES} B"
    if heads // k_cache.shape[1] > decode.MAX_QUERY_GROUP:
        return f"q heads per kv head={heads // k_cache.shape[1]}; at most {decode.MAX_QUERY_GROUP}"
    need = kernel.resident_weight_bytes(heads, k_cache.shape[1], H, hidden.element_size(), fp8)  # one program
    if need > kernel.WEIGHTS_SBUF_BYTES:
        budget = kernel.WEIGHTS_SBUF_BYTES
        return f"{heads} query heads at H={H}: the weights need {need} B of SBUF per partition (at most {budget})"
    return None


def _plain_supports(
    hidden,
    residual,
    norm_weight,
    eps,
    qkv_weight,
    q_norm_weight,
    k_norm_weight,
    positions,
    cos_sin_cache,
    o_weight,
    k_cache,
    v_cache,
    slot_mapping,
    block_tables,
    context_lens,
    scale,
) -> str | None:
    for name, w in (("qkv_weight", qkv_weight), ("o_weight", o_weight)):
        if w.dim() != 2 or w.dtype != hidden.dtype:
            return f"{name} {tuple(w.shape)} {w.dtype}; the fused block takes [N, K] in the activations' dtype"
    heads = o_weight.shape[1] // k_cache.shape[-1]
    return attention_block_reason(hidden, residual, k_cache, heads, fp8=False)


def _fp8_supports(
    hidden,
    residual,
    norm_weight,
    eps,
    qkv_weight,
    qkv_scale_inv,
    q_norm_weight,
    k_norm_weight,
    positions,
    cos_sin_cache,
    o_weight,
    o_scale_inv,
    k_cache,
    v_cache,
    slot_mapping,
    block_tables,
    context_lens,
    scale,
) -> str | None:
    heads = o_weight.shape[1] // k_cache.shape[-1]
    return attention_block_reason(hidden, residual, k_cache, heads, fp8=True)


def _run(backend: str, fn, a, weights: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch ``fn`` (either kernel) with ``weights`` (its q/k/v and o arguments, in order) and copy the caches back
    where the kernel returned new tensors (the emulator; ``ops.attention``, module docstring)."""
    ints = [t.to(torch.int32).contiguous() for t in (a.positions, a.slot_mapping, a.block_tables, a.context_lens)]
    qkv, o = weights
    out, r, k_new, v_new = call_kernel(
        backend,
        fn,
        a.hidden.contiguous(),
        a.residual.contiguous(),
        a.norm_weight.contiguous(),
        *qkv,
        a.q_norm_weight.contiguous(),
        a.k_norm_weight.contiguous(),
        ints[0],
        a.cos_sin_cache.float().contiguous(),
        *o,
        a.k_cache,
        a.v_cache,
        *ints[1:],
        float(a.eps),
        float(a.scale),
        grid=launch_grid(backend),  # query heads split over the physical cores (kernels/attention_block.py, "Grid")
    )
    for cache, returned in ((a.k_cache, k_new), (a.v_cache, v_new)):
        if returned.data_ptr() != cache.data_ptr():
            cache.copy_(returned)
    return out, r


def _plain_kernel(
    backend: str,
    hidden,
    residual,
    norm_weight,
    eps,
    qkv_weight,
    q_norm_weight,
    k_norm_weight,
    positions,
    cos_sin_cache,
    o_weight,
    k_cache,
    v_cache,
    slot_mapping,
    block_tables,
    context_lens,
    scale,
):
    a = SimpleNamespace(**locals())  # the op's arguments by name, for _run
    qkv_t, o_t = linear.kernel_weight(qkv_weight), linear.kernel_weight(o_weight)  # W^T, views once prepared
    return _run(backend, load_kernels("attention_block").attention_block_decode, a, ((qkv_t,), (o_t,)))


def _fp8_kernel(
    backend: str,
    hidden,
    residual,
    norm_weight,
    eps,
    qkv_weight,
    qkv_scale_inv,
    q_norm_weight,
    k_norm_weight,
    positions,
    cos_sin_cache,
    o_weight,
    o_scale_inv,
    k_cache,
    v_cache,
    slot_mapping,
    block_tables,
    context_lens,
    scale,
):
    a = SimpleNamespace(**locals())  # the op's arguments by name, for _run
    qkv = fp8.linear_fp8_kernel_weights(qkv_weight, qkv_scale_inv)
    o = fp8.linear_fp8_kernel_weights(o_weight, o_scale_inv)
    return _run(backend, load_kernels("attention_block").attention_block_decode_fp8, a, (qkv, o))


SPECS = (
    OpSpec(
        "attention_block",
        kernel=KernelImpl(_plain_kernel, _plain_supports),
        compose=attention_block_sequence,
    ),
    OpSpec(
        "attention_block_fp8",
        kernel=KernelImpl(_fp8_kernel, _fp8_supports),
        compose=attention_block_fp8_sequence,
    ),
)
