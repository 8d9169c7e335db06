"""Block-scaled FP8 weights (Qwen's and DeepSeek's fine-grained FP8 checkpoints): ``linear_fp8`` and
``moe_experts_fp8``, weight-only (activations stay in the model dtype).

A weight ``W [N, K]`` is stored as ``float8_e4m3fn`` with one fp32 ``scale_inv`` per ``BLOCK x BLOCK`` block
(``[ceil(N / BLOCK), ceil(K / BLOCK)]``, the last row/column of blocks possibly partial): ``W[n, k] =
float(Wq[n, k]) * scale_inv[n // BLOCK, k // BLOCK]``. The references dequantize that way (in fp32, then rounded
once to the activation dtype, as transformers' ``Fp8Dequantize`` does) and run the unquantized references, so an
FP8 model matches Hugging Face loading the same checkpoint with ``dequantize=True``.

Experts keep ``w13 [E, 2I, H]`` with ``w13_scale_inv [E, 2 * ceil(I / BLOCK), ceil(H / BLOCK)]``: gate's blocks then
up's, as the two checkpoint tensors are scaled separately; ``w2 [E, H, I]`` with ``[E, ceil(H / BLOCK), ceil(I /
BLOCK)]``. No NKI kernel yet: under every backend these ops run their torch references (``ops.bind`` logs it).
"""

from __future__ import annotations

import torch

from vllm_nki_moe.ops.linear import linear
from vllm_nki_moe.ops.moe import moe_experts
from vllm_nki_moe.ops.spec import OpSpec

BLOCK = 128  # weight_block_size [128, 128]: the only block the published checkpoints use
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


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


def dequantize_w13(w13: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Experts' ``w13 [E, 2I, H]``: gate and up dequantized with their own block grids (``scale_inv`` rows: gate's
    ``ceil(I/B)`` then up's)."""
    inter = w13.shape[-2] // 2
    nb = blocks(inter)
    gate = dequantize(w13[..., :inter, :], scale_inv[..., :nb, :], dtype)
    up = dequantize(w13[..., inter:, :], scale_inv[..., nb:, :], dtype)
    return torch.cat((gate, up), dim=-2)


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
    w13_used = dequantize_w13(w13[used], w13_scale_inv[used], hidden.dtype)
    w2_used = dequantize(w2[used], w2_scale_inv[used], hidden.dtype)
    remap = torch.full((w13.shape[0],), -1, dtype=topk_ids.dtype, device=topk_ids.device)
    remap[used] = torch.arange(used.numel(), dtype=topk_ids.dtype, device=topk_ids.device)
    return moe_experts(hidden, w13_used, w2_used, topk_weights, remap[topk_ids])


SPECS = (
    OpSpec("linear_fp8", linear_fp8),
    OpSpec("moe_experts_fp8", moe_experts_fp8, traceable=False),  # data-dependent expert selection
)
