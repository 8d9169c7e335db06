"""Block-scaled FP8 weights (Qwen's and DeepSeek's fine-grained FP8 checkpoints): ``linear_fp8`` and
``moe_experts_fp8``, weight-only (activations stay in the model dtype).

A weight ``W [N, K]`` is stored as ``float8_e4m3fn`` with one fp32 ``scale_inv`` per ``BLOCK x BLOCK`` block
(``[ceil(N / BLOCK), ceil(K / BLOCK)]``, the last row/column of blocks possibly partial): ``W[n, k] =
float(Wq[n, k]) * scale_inv[n // BLOCK, k // BLOCK]``. The references dequantize that way (in fp32, then rounded
once to the activation dtype, as transformers' ``Fp8Dequantize`` does) and run the unquantized references, so an
FP8 model matches Hugging Face loading the same checkpoint with ``dequantize=True``.

Experts are stored per rank with their scales expanded along the tensor-parallel dimension, so that any TP degree
works (a rank's share of rows need not start on a block boundary: Qwen3-30B-A3B's 768 expert rows give 192 per rank
at TP 4): ``w13 [E, 2I, H]`` with ``w13_scale_inv [E, 2I, ceil(H / BLOCK)]`` (one row of block scales per weight row,
gate's rows then up's) and ``w2 [E, H, I]`` with ``w2_scale_inv [E, ceil(H / BLOCK), I]`` (one column per weight
column); a few percent of the FP8 bytes.

Kernels: ``moe_experts_fp8`` runs ``kernels/moe_fp8.py``'s ``moe_decode_fp8`` (one expert read per (token, slot))
for few tokens (``use_fp8_decode``), else ``kernels/moe_prefill_fp8.py`` (tokens grouped by expert, each used expert
read once per block, the block size of ``ops.moe.bucket_block_size``), both on the experts converted
once at load, in place, to their layout (trn2's FP8 format, hidden split into scale blocks:
``prepare_fp8_experts_for_kernels``); ``linear_fp8`` runs ``kernels/linear_fp8.py`` on the
weight converted the same way (``prepare_linear_fp8_for_kernels``: trn2's format, block-major, the model's shapes);
``moe_block_fp8`` (the MoE half of a layer with FP8 experts) runs the fused ``moe_block_decode_fp8`` at decode.
"""

from __future__ import annotations

from typing import Callable

import torch

from vllm_nki_moe.ops.kernel_call import call_kernel, launch_grid, load_kernels
from vllm_nki_moe.ops.linear import linear
from vllm_nki_moe.ops.moe import bucket_block_size, moe_experts, norm_and_route
from vllm_nki_moe.ops.spec import KernelImpl, OpSpec, WeightLayouts
from vllm_nki_moe.ops.weight_cache import WeightCache

BLOCK = 128  # weight_block_size [128, 128]: the only block the published checkpoints use
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# moe_experts_fp8 runs the decode kernel while T * K <= E * this (or T == 1), the expert-grouped kernel above. Cost
# model, Qwen3-30B-A3B TP 4 LNC 2 (``kernels check --tp 4 --only moe_decode_fp8,moe_prefill_fp8 --tokens T --lnc 2``),
# decode vs grouped: T = 2 30.6 vs 41.0 us, T = 4 58.8 vs 72.0, T = 8 117.4 vs 120.8, T = 12 176.0 vs 165.2, T = 16
# 234.6 vs 200.7. The grouped kernel's fixed Tensor work per block (a PSUM slice per scale block) moves the crossover
# later than the bf16 kernels' (``ops.moe.DECODE_SLOTS_PER_EXPERT``).
DECODE_FP8_SLOTS_PER_EXPERT = 1 / 2


def blocks(size: int) -> int:
    return -(-size // BLOCK)


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight [..., N, K]`` fp8 times its block scales ``[..., ceil(N/B), ceil(K/B)]`` in fp32, rounded to
    ``dtype``."""
    n, k = weight.shape[-2:]
    if scale_inv.shape[-2:] != (blocks(n), blocks(k)) or scale_inv.shape[:-2] != weight.shape[:-2]:
        raise ValueError(
            f"fp8 dequantize: weight {tuple(weight.shape)} with scale_inv {tuple(scale_inv.shape)}; the scales must be "
            f"[..., ceil(N/{BLOCK}), ceil(K/{BLOCK})] = [..., {blocks(n)}, {blocks(k)}]"
        )
    scale = scale_inv.float().repeat_interleave(BLOCK, dim=-2)[..., :n, :].repeat_interleave(BLOCK, dim=-1)[..., :k]
    return (weight.float() * scale).to(dtype)


def dequantize_rows(weight: torch.Tensor, row_scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight [..., N, K]`` fp8 with one row of block scales per weight row ``[..., N, ceil(K/B)]`` (experts' w13)."""
    k = weight.shape[-1]
    _check_expanded("rows", weight, row_scales, (*weight.shape[:-1], blocks(k)))
    return (weight.float() * row_scales.float().repeat_interleave(BLOCK, dim=-1)[..., :k]).to(dtype)


def dequantize_cols(weight: torch.Tensor, col_scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight [..., N, K]`` fp8 with one column of block scales per weight column ``[..., ceil(N/B), K]`` (w2)."""
    n = weight.shape[-2]
    _check_expanded("cols", weight, col_scales, (*weight.shape[:-2], blocks(n), weight.shape[-1]))
    return (weight.float() * col_scales.float().repeat_interleave(BLOCK, dim=-2)[..., :n, :]).to(dtype)


def _check_expanded(kind: str, weight: torch.Tensor, scales: torch.Tensor, want: tuple) -> None:
    if tuple(scales.shape) != tuple(want):
        raise ValueError(
            f"fp8 dequantize_{kind}: weight {tuple(weight.shape)} with scales {tuple(scales.shape)}; must be {want}"
        )


def expand_rows(scale_inv: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    """Checkpoint block scales ``[ceil(N/B), ceil(K/B)]`` -> rows ``start .. start+rows`` of one scale row per weight
    row ``[rows, ceil(K/B)]`` (a rank's share of a column-parallel weight)."""
    return scale_inv.repeat_interleave(BLOCK, dim=0)[start : start + rows]


def expand_cols(scale_inv: torch.Tensor, start: int, cols: int) -> torch.Tensor:
    """Checkpoint block scales ``[ceil(N/B), ceil(K/B)]`` -> columns ``start .. start+cols`` of one scale column per
    weight column ``[ceil(N/B), cols]`` (a rank's share of a row-parallel weight)."""
    return scale_inv.repeat_interleave(BLOCK, dim=1)[:, start : start + cols]


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` (float) -> (``float8_e4m3fn [N, K]``, fp32 ``scale_inv [ceil(N/B), ceil(K/B)]``): each block
    scaled so its largest magnitude maps to the format's maximum (448), the recipe of the published checkpoints."""
    n, k = weight.shape
    w = weight.float()
    padded = torch.zeros(blocks(n) * BLOCK, blocks(k) * BLOCK)
    padded[:n, :k] = w
    amax = padded.reshape(blocks(n), BLOCK, blocks(k), BLOCK).abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    full = scale_inv.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return (w / full).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale_inv


def quantize_experts(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Float experts ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` -> FP8 experts as the model holds them (``w13``,
    ``w13_scale_inv``, ``w2``, ``w2_scale_inv``; module docstring): gate, up and down quantized as the checkpoints'
    separate tensors are, their scales expanded along I (one rank, TP 1)."""
    E, I2, H = w13.shape
    inter = I2 // 2
    q13 = torch.empty(E, I2, H, dtype=FP8_DTYPE)
    s13 = torch.empty(E, I2, blocks(H))
    q2 = torch.empty(E, H, inter, dtype=FP8_DTYPE)
    s2 = torch.empty(E, blocks(H), inter)
    for e in range(E):
        for rows in (slice(0, inter), slice(inter, I2)):
            q, scale = quantize(w13[e, rows])
            q13[e, rows], s13[e, rows] = q, expand_rows(scale, 0, inter)
        q, scale = quantize(w2[e])
        q2[e], s2[e] = q, expand_cols(scale, 0, inter)
    return q13, s13, q2, s2


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    """``x [T, K] @ W^T`` for an FP8 ``weight [N, K]`` with block scales ``[ceil(N/B), ceil(K/B)]``; x's dtype."""
    return linear(x, dequantize(weight, weight_scale_inv, x.dtype))


def moe_experts_fp8(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w13_scale_inv: torch.Tensor,
    w2: torch.Tensor,
    w2_scale_inv: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """``moe_experts`` with FP8 experts (module docstring for the scale layouts). The reference dequantizes only the
    experts the tokens selected."""
    used = torch.unique(topk_ids)
    w13_used = dequantize_rows(w13[used], w13_scale_inv[used], hidden.dtype)
    w2_used = dequantize_cols(w2[used], w2_scale_inv[used], hidden.dtype)
    remap = torch.full((w13.shape[0],), -1, dtype=topk_ids.dtype, device=topk_ids.device)
    remap[used] = torch.arange(used.numel(), dtype=topk_ids.dtype, device=topk_ids.device)
    return moe_experts(hidden, w13_used, w2_used, topk_weights, remap[topk_ids])


# ---------------------------------------------------------------------------------------------------------------------
# NKI kernel (kernels/moe_fp8.py)

KERNEL_DTYPES = (torch.bfloat16, torch.float32)
_kernel_weights = WeightCache()  # model-layout experts handed by tools and tests, converted once


def _is_kernel_layout(w13: torch.Tensor) -> bool:
    return w13.dtype == torch.uint8  # trn2 FP8 bytes (moe_fp8.fp8_experts_kernel_layout)


def _moe_experts_fp8_supports(hidden, w13, w13_scale_inv, w2, w2_scale_inv, topk_weights, topk_ids) -> str | None:
    if hidden.dtype not in KERNEL_DTYPES:
        return f"hidden.dtype={hidden.dtype}; the kernel takes bfloat16 or float32 activations"
    if hidden.dim() != 2 or hidden.shape[0] == 0:
        return f"hidden.shape={tuple(hidden.shape)}; must be [T >= 1, H]"
    if _is_kernel_layout(w13):
        return None
    H, inter = hidden.shape[1], w13.shape[1] // 2
    if H % BLOCK:
        return f"H={H}; the kernel needs a multiple of {BLOCK} (one scale block per contraction tile)"
    tiles = -(-inter // 128)
    if inter % tiles:
        return f"I={inter}; the kernel splits I into ceil(I/128)={tiles} equal partition tiles"
    return None


def prepare_fp8_experts_for_kernels(w13, w13_scale_inv, w2, w2_scale_inv) -> None:
    """In place, once after loading: the kernel's layout (``moe_fp8.fp8_experts_kernel_layout``) where the kernel
    takes these experts, so the model keeps one copy."""
    probe = torch.zeros(1, w13.shape[2], dtype=torch.bfloat16)
    ids = torch.zeros(1, 1, dtype=torch.int64)
    if _is_kernel_layout(w13) or _moe_experts_fp8_supports(probe, w13, w13_scale_inv, w2, w2_scale_inv, ids, ids):
        return
    converted = load_kernels("moe_fp8").fp8_experts_kernel_layout(w13, w13_scale_inv, w2, w2_scale_inv)
    for param, data in zip((w13, w13_scale_inv, w2, w2_scale_inv), converted):
        param.data = data


def _model_layout(w13, w13_scale_inv, w2, w2_scale_inv) -> tuple[torch.Tensor, ...]:
    """The kernel layout back in the model's: trn2's halved values as e4m3fn (exact), the doubled scales."""
    w13, s13, w2, s2 = load_kernels("moe_fp8").fp8_experts_model_layout(w13, w13_scale_inv, w2, w2_scale_inv)
    return w13.to(FP8_DTYPE), s13, w2.to(FP8_DTYPE), s2


def moe_experts_fp8_any_layout(hidden, w13, w13_scale_inv, w2, w2_scale_inv, topk_weights, topk_ids):
    """:func:`moe_experts_fp8` on experts in the model's layout or the kernel's."""
    if _is_kernel_layout(w13):
        w13, w13_scale_inv, w2, w2_scale_inv = _model_layout(w13, w13_scale_inv, w2, w2_scale_inv)
    return moe_experts_fp8(hidden, w13, w13_scale_inv, w2, w2_scale_inv, topk_weights, topk_ids)


def use_fp8_decode(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether ``moe_experts_fp8`` runs the FP8 decode kernel (else the expert-grouped one) at these sizes."""
    if num_tokens > load_kernels("moe_fp8").MAX_DECODE_TOKENS:
        return False
    return num_tokens == 1 or num_tokens * top_k <= num_experts * DECODE_FP8_SLOTS_PER_EXPERT


def _moe_experts_fp8_kernel(backend, hidden, w13, w13_scale_inv, w2, w2_scale_inv, topk_weights, topk_ids):
    kernel = load_kernels("moe_fp8")
    weights = (w13, w13_scale_inv, w2, w2_scale_inv)
    if not _is_kernel_layout(w13):  # tools and tests hand model-layout experts: a converted copy, made once
        weights = _kernel_weights.get(kernel.fp8_experts_kernel_layout, *weights)
    ids, routing = topk_ids.to(torch.int32).contiguous(), topk_weights.float().contiguous()
    T, (E, K) = hidden.shape[0], (weights[0].shape[0], ids.shape[1])
    if not use_fp8_decode(T, K, E):  # each used expert read once (kernels/moe_prefill_fp8.py)
        inter = weights[0].shape[1] * weights[0].shape[4] // 2  # IT * IP
        meta = load_kernels("moe_prefill").prefill_block_metadata(ids, routing, E, bucket_block_size(T, K, E, inter))
        prefill = load_kernels("moe_prefill_fp8").moe_prefill_fp8
        # the blocks interleaved over the physical cores (kernels/moe_prefill_fp8.py, "Grid")
        return call_kernel(backend, prefill, hidden.contiguous(), *weights, *meta, grid=launch_grid(backend))
    # up to MAX_DECODE_TOKENS (use_fp8_decode); the slots split over the physical cores (kernels/moe_fp8.py, "Grid")
    x = hidden.contiguous()
    return call_kernel(backend, kernel.moe_decode_fp8, x, *weights, routing, ids, grid=launch_grid(backend))


def moe_block_fp8_sequence(impls: dict[str, Callable]) -> Callable:
    """The decoder layer's MoE half with FP8 experts: ``moe_block``'s sequence (residual add + RMSNorm, gate, router)
    with ``moe_experts_fp8``. ``moe_block_fp8(hidden [T, H], residual [T, H], norm_weight [H], eps, gate_weight [E, H],
    w13, w13_scale_inv, w2, w2_scale_inv, top_k, renormalize) -> (experts' output [T, H], new residual [T, H])``.
    A backend with the fused kernel (``moe_block_decode_fp8``) runs it where it applies (decode), this sequence
    elsewhere."""
    route, experts = norm_and_route(impls), impls["moe_experts_fp8"]

    def moe_block_fp8(
        hidden: torch.Tensor,
        residual: torch.Tensor,
        norm_weight: torch.Tensor,
        eps: float,
        gate_weight: torch.Tensor,
        w13: torch.Tensor,
        w13_scale_inv: torch.Tensor,
        w2: torch.Tensor,
        w2_scale_inv: torch.Tensor,
        top_k: int,
        renormalize: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        normed, residual, topk_weights, topk_ids = route(
            hidden, residual, norm_weight, eps, gate_weight, top_k, renormalize
        )
        return experts(normed, w13, w13_scale_inv, w2, w2_scale_inv, topk_weights, topk_ids), residual

    return moe_block_fp8


def _is_linear_kernel_layout(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.uint8  # trn2 FP8 bytes (linear_fp8.linear_fp8_kernel_layout)


def _linear_fp8_supports(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> str | None:
    if x.dtype not in KERNEL_DTYPES:
        return f"x.dtype={x.dtype}; the kernel takes bfloat16 or float32 activations"
    if x.dim() != 2 or x.shape[0] == 0 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        return f"x {tuple(x.shape)}, weight {tuple(weight.shape)}; must be [T >= 1, K], [N, K]"
    K = x.shape[1]
    if K > BLOCK and K % BLOCK:
        return f"K={K}; the kernel needs K < {BLOCK} or a multiple of {BLOCK} (one scale block per contraction tile)"
    return None


def prepare_linear_fp8_for_kernels(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> None:
    """In place, once after loading: the kernel's layout (``linear_fp8.linear_fp8_kernel_layout``: the same shapes,
    trn2 FP8 bytes) where the kernel takes the weight, so the layer keeps one copy."""
    probe = torch.zeros(1, weight.shape[1], dtype=torch.bfloat16)
    if _is_linear_kernel_layout(weight) or _linear_fp8_supports(probe, weight, weight_scale_inv):
        return
    converted = load_kernels("linear_fp8").linear_fp8_kernel_layout(weight, weight_scale_inv)
    for param, data in zip((weight, weight_scale_inv), converted):
        param.data = data


def linear_fp8_any_layout(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> torch.Tensor:
    """:func:`linear_fp8` on a weight in the model's layout or the kernel's."""
    if _is_linear_kernel_layout(weight):
        values, weight_scale_inv = load_kernels("linear_fp8").linear_fp8_model_layout(weight, weight_scale_inv)
        weight = values.to(FP8_DTYPE)  # trn2's halved values are e4m3fn values too (exact)
    return linear_fp8(x, weight, weight_scale_inv)


def linear_fp8_kernel_weights(weight: torch.Tensor, weight_scale_inv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A projection's FP8 weight and scales in ``linear_fp8``'s kernel layout: as they are once the model prepared
    them; otherwise (tools and tests hand model-layout weights) converted once and cached."""
    if _is_linear_kernel_layout(weight):
        return weight, weight_scale_inv
    return _kernel_weights.get(load_kernels("linear_fp8").linear_fp8_kernel_layout, weight, weight_scale_inv)


def _linear_fp8_kernel(backend: str, x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor):
    kernel = load_kernels("linear_fp8")
    weights = linear_fp8_kernel_weights(weight, weight_scale_inv)
    rows = kernel.max_tokens(x.shape[1], x.element_size())  # x stays in SBUF: longer inputs go in token tiles
    tiles = [
        # output blocks split over the physical cores (kernels/linear_fp8.py, "Grid")
        call_kernel(backend, kernel.linear_fp8, x[t0 : t0 + rows].contiguous(), *weights, grid=launch_grid(backend))
        for t0 in range(0, x.shape[0], rows)
    ]
    return tiles[0] if len(tiles) == 1 else torch.cat(tiles)


def moe_block_fp8_supports(
    hidden, residual, norm_weight, eps, gate_weight, w13, w13_scale_inv, w2, w2_scale_inv, top_k, renormalize
) -> str | None:
    """Where the fused FP8 decode block applies; elsewhere ``moe_block_fp8`` runs as separate ops (not an error)."""
    from vllm_nki_moe.ops.moe import fused_block_reason

    reason = fused_block_reason(hidden, residual, norm_weight, gate_weight, w13.shape[0], top_k)
    ids = torch.zeros(hidden.shape[0], top_k, dtype=torch.int32)
    return reason or _moe_experts_fp8_supports(hidden, w13, w13_scale_inv, w2, w2_scale_inv, ids.float(), ids)


def _transposed(weight: torch.Tensor) -> torch.Tensor:
    return weight.t().contiguous()


def moe_block_fp8_kernel_weights(gate_weight, w13, w13_scale_inv, w2, w2_scale_inv) -> tuple[torch.Tensor, ...]:
    """The MoE half's weights as ``moe_block_decode_fp8`` reads them: (gate_t [H, E], w13, s13, w2, s2 in
    ``fp8_experts_kernel_layout``); as they are once the model prepared them, else converted once and cached."""
    weights = (w13, w13_scale_inv, w2, w2_scale_inv)
    if not _is_kernel_layout(w13):  # tools and tests hand model-layout experts: a converted copy, made once
        weights = _kernel_weights.get(load_kernels("moe_fp8").fp8_experts_kernel_layout, *weights)
    # prepared (router.prepare_gate_for_kernels): the transpose [H, E] is a contiguous view; else converted once
    gate_t = gate_weight.t() if gate_weight.t().is_contiguous() else _kernel_weights.get(_transposed, gate_weight)
    return (gate_t, *weights)


def _moe_block_fp8_kernel(
    backend, hidden, residual, norm_weight, eps, gate_weight, w13, w13_scale_inv, w2, w2_scale_inv, top_k, renormalize
):
    return call_kernel(
        backend,
        load_kernels("moe_fp8").moe_block_decode_fp8,
        hidden.contiguous(),
        residual.contiguous(),
        norm_weight.contiguous(),
        *moe_block_fp8_kernel_weights(gate_weight, w13, w13_scale_inv, w2, w2_scale_inv),
        float(eps),
        int(top_k),
        bool(renormalize),
        grid=launch_grid(backend),  # slots split over the physical cores (kernels/moe_fp8.py, "Grid")
    )


def _no_host_layout(*weights: torch.Tensor) -> None:
    """The torch backend reads the model's layout."""


SPECS = (
    OpSpec(
        "linear_fp8",
        linear_fp8,
        kernel=KernelImpl(_linear_fp8_kernel, _linear_fp8_supports),
        weights=WeightLayouts(_no_host_layout, prepare_linear_fp8_for_kernels, linear_fp8_any_layout),
    ),
    OpSpec(
        "moe_experts_fp8",
        moe_experts_fp8,
        kernel=KernelImpl(_moe_experts_fp8_kernel, _moe_experts_fp8_supports),
        traceable=False,  # data-dependent expert selection
        weights=WeightLayouts(_no_host_layout, prepare_fp8_experts_for_kernels, moe_experts_fp8_any_layout),
    ),
    OpSpec(
        "moe_block_fp8",
        kernel=KernelImpl(_moe_block_fp8_kernel, moe_block_fp8_supports),
        compose=moe_block_fp8_sequence,
    ),
)
