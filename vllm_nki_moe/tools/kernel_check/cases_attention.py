"""Kernel-check cases for ``kernels/attention_prefill.py`` and ``kernels/attention_decode.py`` at one rank's shapes.

Per decoder layer: one attention call. ``tokens`` is the prompt length of a prefill case and the batch of a decode
case (one new token per sequence, each with ``shapes.context_len`` tokens in the cache including the new one; a
second decode case at LONG_CONTEXT tokens is checked but not counted by ``kernels bench``). Caches hold the
sequences' blocks in shuffled order among spare blocks, block size 32 (the vLLM Neuron plugin's default).

Minimum HBM bytes: decode must read every cached K and V row of every sequence once (the roofline that matters:
decode attention is bandwidth-bound), plus q, the new K/V (read and written to the cache), the slots, the block
table and the output. Prefill must read q, k, v, write the output and the cache rows; it is compute-bound, and its
roofline is the Tensor Engine time of ``prefill_macs`` (Hq * D * T(T+1)/2 MACs for each of QK^T and PV, causal).

Reproduce the issue-5 figures: ``vllm-nki-moe kernels check --only attention --tokens 1,8,128,640,2048``.
"""

from __future__ import annotations

import numpy as np
import torch

from nki_emulator import install

install()  # `import nki` in the kernels: the emulator unless the real package imports (then a no-op)

from vllm_nki_moe.kernels import attention_block as block_kernel  # noqa: E402 - after install()
from vllm_nki_moe.kernels import attention_decode as decode_kernel  # noqa: E402
from vllm_nki_moe.kernels import attention_prefill as prefill_kernel  # noqa: E402
from vllm_nki_moe.kernels import linear_fp8  # noqa: E402
from vllm_nki_moe.ops.moe import fused_block_applies  # noqa: E402
from vllm_nki_moe.tools.kernel_check.registry import KernelCase  # noqa: E402
from vllm_nki_moe.tools.kernel_check.shapes import KernelShapes  # noqa: E402
from vllm_nki_moe.tools.kernel_check.tolerances import dtype_key  # noqa: E402

BLOCK_SIZE = 32  # the vLLM Neuron plugin's default KV block size (research/vllm.md, 1.3)
SPARE_BLOCKS = 7  # cache blocks owned by nobody, so that the sequences' blocks are scattered among them
LONG_CONTEXT = 4096  # the second decode context of issue 5 (a long-context serving length)
# Decode cases only up to this batch: a larger per-rank decode batch at 4,096 tokens takes minutes in the emulator.
MAX_DECODE_BATCH = 64
_DT_NAMES = {"bfloat16": "bf16", "float32": "fp32"}


def _randn(rng: np.random.Generator, shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(dtype)


def _tolerance(dtype: torch.dtype) -> str:
    # bf16 rounds the probabilities to bf16 before P @ V (a matmul chain); fp32 goes through two contractions
    return "bfloat16_matmul" if dtype_key(dtype) == "bfloat16" else "float32_matmul"


def prefill_macs(tokens: int, q_heads: int, head_dim: int) -> int:
    """MACs causal attention must do: QK^T and PV over the T(T+1)/2 (query, key) pairs of each query head."""
    return 2 * q_heads * head_dim * tokens * (tokens + 1) // 2


def _shuffled_cache(rng, s: KernelShapes, seq_blocks: list[int]):
    """Caches with random contents and a block table placing each sequence's blocks at shuffled cache blocks."""
    dt, hk, d = s.torch_dtype, s.kv_heads, s.head_dim
    nb = sum(seq_blocks) + SPARE_BLOCKS
    order = rng.permutation(nb)
    width = max(seq_blocks)
    tables = np.zeros((len(seq_blocks), width), dtype=np.int32)
    start = 0
    for b, n in enumerate(seq_blocks):
        tables[b, :n] = order[start : start + n]
        start += n
    k_cache = _randn(rng, (nb, hk, BLOCK_SIZE, d), dt)
    v_cache = _randn(rng, (nb, hk, BLOCK_SIZE, d), dt)
    return k_cache, v_cache, torch.from_numpy(tables)


def _prefill_case(s: KernelShapes, T: int) -> KernelCase:
    dt, hq, hk, d = s.torch_dtype, s.q_heads, s.kv_heads, s.head_dim
    item = dt.itemsize

    def inputs(rng: np.random.Generator) -> tuple:
        q, k, v = _randn(rng, (T, hq * d), dt), _randn(rng, (T, hk * d), dt), _randn(rng, (T, hk * d), dt)
        blocks = -(-T // BLOCK_SIZE)
        k_cache, v_cache, tables = _shuffled_cache(rng, s, [blocks])
        pos = torch.arange(T)
        slots = (tables[0, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE).to(torch.int32)
        return q, k, v, k_cache, v_cache, slots, d**-0.5

    unsupported = None
    if T > prefill_kernel.MAX_PREFILL_TOKENS:
        unsupported = f"T={T}; the prefill kernel takes at most {prefill_kernel.MAX_PREFILL_TOKENS} tokens"
    return KernelCase(
        kernel="attention_prefill",
        shapes=f"T={T} q={hq}x{d} kv={hk} {_DT_NAMES[s.dtype]}",
        build_inputs=inputs,
        kernel_fn=prefill_kernel.attention_prefill,
        reference=prefill_kernel.attention_prefill_ref,
        tolerance=_tolerance(dt),
        # q, k, v read; out written; k, v written to the cache; the slots
        min_hbm_bytes=(2 * T * hq * d + 4 * T * hk * d) * item + 4 * T,
        min_macs=prefill_macs(T, hq, d),
        calls_per_layer=1,
        phase="prefill",
        unsupported=unsupported,
    )


def _decode_case(s: KernelShapes, B: int, context: int, counted: bool) -> KernelCase:
    dt, hq, hk, d = s.torch_dtype, s.q_heads, s.kv_heads, s.head_dim
    item = dt.itemsize
    blocks = -(-context // BLOCK_SIZE)

    def inputs(rng: np.random.Generator) -> tuple:
        k_cache, v_cache, tables = _shuffled_cache(rng, s, [blocks] * B)
        last = context - 1
        slots = (tables[:, last // BLOCK_SIZE].long() * BLOCK_SIZE + last % BLOCK_SIZE).to(torch.int32)
        q, k, v = _randn(rng, (B, hq * d), dt), _randn(rng, (B, hk * d), dt), _randn(rng, (B, hk * d), dt)
        lens = torch.full((B,), context, dtype=torch.int32)
        return q, k, v, k_cache, v_cache, slots, tables, lens, d**-0.5

    kv_read = 2 * B * context * hk * d * item  # every cached K and V row once
    return KernelCase(
        kernel="attention_decode",
        shapes=f"B={B} ctx={context} q={hq}x{d} kv={hk} bs={BLOCK_SIZE} {_DT_NAMES[s.dtype]}",
        build_inputs=inputs,
        kernel_fn=decode_kernel.attention_decode,
        reference=decode_kernel.attention_decode_ref,
        tolerance=_tolerance(dt),
        # + q read and out written, the new K/V read and written, slots, block table, context lengths
        min_hbm_bytes=kv_read + (2 * B * hq * d + 4 * B * hk * d) * item + 4 * B * (2 + blocks),
        calls_per_layer=1 if counted else 0,
        lnc_grid=True,  # the sequences split over the programs (kernels/attention_decode.py, "Grid")
        phase="decode",
    )


def attention_block_applies(s: KernelShapes, tokens: int) -> bool:
    """Whether a decode step of ``tokens`` sequences runs the attention half as one kernel (the model's
    ``attention_block`` / ``attention_block_fp8`` op where its kernel applies, ``ops.attention_block``): q/k norm,
    head_dim 128, few enough tokens. The step then counts ``attention_block_decode`` (or ``_fp8``) in place of the
    fused add + norm, q/k/v, q/k norm + RoPE, attention and o kernels (the first layer, with no residual to add, runs
    those; the step counts the fused block there too)."""
    most = min(block_kernel.FUSED_MAX_TOKENS, 512 // max(s.hidden // 128, s.q_heads))
    return _block_fits(s, s.fp8) and tokens <= most


def layers_kernel_applies(s: KernelShapes, tokens: int) -> bool:
    """Whether a decode step of ``tokens`` sequences runs its layers as one kernel (``ops.decoder_layers``): an FP8
    checkpoint whose every layer is MoE and runs both fused halves (``attention_block_applies`` and
    ``fused_block_applies``: batch 1 at Qwen3-30B-A3B's sizes)."""
    return (
        s.fp8
        and s.experts > 0
        and s.moe_layers == s.layers
        and attention_block_applies(s, tokens)
        and fused_block_applies(tokens, s.top_k, s.experts)
    )


def _block_fits(s: KernelShapes, fp8: bool) -> bool:
    """Whether the fused kernel of that weight format takes the model's heads (``ops.attention_block``: one program
    holding every head's weights within ``WEIGHTS_SBUF_BYTES``)."""
    need = block_kernel.resident_weight_bytes(s.q_heads, s.kv_heads, s.hidden, s.torch_dtype.itemsize, fp8)
    shaped = s.qk_norm and s.head_dim == block_kernel.HEAD_DIM and s.hidden % 128 == 0
    return shaped and need <= block_kernel.WEIGHTS_SBUF_BYTES


def _block_case(s: KernelShapes, B: int, context: int, fp8: bool) -> KernelCase:
    """``attention_block_decode_fp8`` (``fp8``: block-scaled FP8 q/k/v and o) or ``attention_block_decode`` (their
    transposes in the activation dtype): B sequences of ``context`` tokens; counted in the step of its format."""
    from vllm_nki_moe.ops import fp8 as fp8_ops
    from vllm_nki_moe.ops.rope import rope_cos_sin_cache

    dt, hq, hk, d, H = s.torch_dtype, s.q_heads, s.kv_heads, s.head_dim, s.hidden
    item = dt.itemsize
    blocks = -(-context // BLOCK_SIZE)
    positions = min(s.max_positions, 1 << 16)

    def projection(rng, n: int, k: int) -> tuple:
        weight = _randn(rng, (n, k), torch.float32) * k**-0.5
        if fp8:
            return linear_fp8.linear_fp8_kernel_layout(*fp8_ops.quantize(weight))
        return (weight.t().contiguous().to(dt),)

    def inputs(rng: np.random.Generator) -> tuple:
        k_cache, v_cache, tables = _shuffled_cache(rng, s, [blocks] * B)
        last = context - 1
        slots = (tables[:, last // BLOCK_SIZE].long() * BLOCK_SIZE + last % BLOCK_SIZE).to(torch.int32)
        hidden, residual = _randn(rng, (B, H), dt), _randn(rng, (B, H), dt)
        gamma, q_norm, k_norm = (1 + 0.1 * _randn(rng, (n,), dt) for n in (H, d, d))
        qkv, o = projection(rng, (hq + 2 * hk) * d, H), projection(rng, H, hq * d)
        pos = torch.full((B,), last, dtype=torch.int32)
        lens = torch.full((B,), context, dtype=torch.int32)
        cos_sin = rope_cos_sin_cache(d, positions, s.rope_theta)
        rest = (k_cache, v_cache, slots, tables, lens, s.rms_eps, d**-0.5)
        return (hidden, residual, gamma, *qkv, q_norm, k_norm, pos, cos_sin, *o, *rest)

    weights = (hq + 2 * hk) * d * H + H * hq * d
    # FP8: one byte per weight and a 4-byte scale per 128 x 128 block; else the activation dtype
    weight_bytes = weights + 4 * ((hq + 2 * hk) + hq) * (H // 128) if fp8 else weights * item
    kv_read = 2 * B * context * hk * d * item
    kernel = block_kernel.attention_block_decode_fp8 if fp8 else block_kernel.attention_block_decode
    return KernelCase(
        kernel="attention_block_decode_fp8" if fp8 else "attention_block_decode",
        shapes=f"B={B} ctx={context} H={H} q={hq}x{d} kv={hk} {'fp8/' if fp8 else ''}{_DT_NAMES[s.dtype]}",
        build_inputs=inputs,
        kernel_fn=kernel,
        reference=block_kernel.attention_block_fp8_ref if fp8 else block_kernel.attention_block_ref,
        tolerance=_tolerance(dt),
        # + hidden and residual read, out and r written, the new K/V written, the norm weights
        min_hbm_bytes=weight_bytes + kv_read + 4 * B * H * item + 2 * B * hk * d * item + (H + 2 * d) * item,
        # counted where the step runs it on its own (not inside the decoder-layers kernel)
        calls_per_layer=1 if attention_block_applies(s, B) and s.fp8 == fp8 and not layers_kernel_applies(s, B) else 0,
        lnc_grid=True,  # the query heads split over the programs (kernels/attention_block.py, "Grid")
        phase="decode",
        covers=("qkv_proj", "o_proj"),
    )


def cases(shapes: KernelShapes, tokens: int) -> list[KernelCase]:
    out = [_prefill_case(shapes, tokens)]
    if tokens <= MAX_DECODE_BATCH:
        counted = not attention_block_applies(shapes, tokens)
        out.append(_decode_case(shapes, tokens, shapes.context_len, counted=counted))
        out += [
            _block_case(shapes, tokens, shapes.context_len, fp8) for fp8 in (False, True) if _block_fits(shapes, fp8)
        ]
        if shapes.context_len != LONG_CONTEXT:
            out.append(_decode_case(shapes, tokens, LONG_CONTEXT, counted=False))
    return out
