"""Kernel-check cases for ``kernels/linear.py``: the dense projections of one rank.

Per layer: the fused q/k/v projection (``qkv_proj``, N = (q + 2 kv) x head_dim per rank) and the o projection
(``o_proj``, K = q x head_dim per rank); per step: the LM head (``lm_head``, the rank's ceil(V / tp) vocabulary rows,
one row of logits per sequence: the rows vLLM samples from) and, once per dense layer (``mlp_only_layers`` /
``decoder_sparse_step``), the dense SwiGLU MLP's ``gate_up`` (N = 2 x intermediate per rank), its ``silu_mul``
(``kernels/silu_mul.py``, between the two matmuls) and ``down``.

Each projection but the LM head is also checked with a block-scaled FP8 weight (``kernels/linear_fp8.py``, case
``linear_fp8.<name>``); those count in the step when the shapes are an FP8 checkpoint's (``KernelShapes.fp8``), the
bf16 ones otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

from nki_emulator import install

install()  # `import nki` in the kernels: the emulator unless the real package imports (then a no-op)

from vllm_nki_moe.kernels import linear, linear_fp8, silu_mul  # noqa: E402 - after install()
from vllm_nki_moe.ops.moe import silu_mul as silu_mul_ref  # noqa: E402
from vllm_nki_moe.tools.kernel_check.cases_attention import attention_block_applies  # noqa: E402
from vllm_nki_moe.tools.kernel_check.registry import KernelCase  # noqa: E402
from vllm_nki_moe.tools.kernel_check.shapes import KernelShapes  # noqa: E402

_DT_NAMES = {"bfloat16": "bf16", "float32": "fp32"}


def _case(
    name: str, shapes: KernelShapes, rows: int, k: int, n: int, per_layer: int, per_step: int, phase: str = "any"
) -> KernelCase:
    dt = shapes.torch_dtype

    def inputs(rng: np.random.Generator) -> tuple:
        x = torch.from_numpy(rng.standard_normal((rows, k), dtype=np.float32)).to(dt)
        weight = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32) * k**-0.5).to(dt)
        return x, linear.linear_kernel_layout(weight)

    return KernelCase(
        kernel=f"linear.{name}",
        shapes=f"T={rows} K={k} N={n} {_DT_NAMES[shapes.dtype]}",
        build_inputs=inputs,
        kernel_fn=linear.linear,
        reference=linear.linear_ref,
        tolerance="float32_matmul" if shapes.dtype == "float32" else "bfloat16",
        min_hbm_bytes=(rows * k + k * n + rows * n) * dt.itemsize,
        min_macs=rows * k * n,
        calls_per_layer=per_layer,
        calls_per_step=per_step,
        lnc_grid=True,  # N split over the programs (kernels/linear.py, "Grid")
        phase=phase,
    )


def _fp8_case(name: str, shapes: KernelShapes, rows: int, k: int, n: int, per_layer: int, per_step: int) -> KernelCase:
    from vllm_nki_moe.ops import fp8

    dt = shapes.torch_dtype

    def inputs(rng: np.random.Generator) -> tuple:
        x = torch.from_numpy(rng.standard_normal((rows, k), dtype=np.float32)).to(dt)
        weight = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32) * k**-0.5)
        return x, *linear_fp8.linear_fp8_kernel_layout(*fp8.quantize(weight))

    scales = -(-n // 128) * -(-k // 128)
    return KernelCase(
        kernel=f"linear_fp8.{name}",
        shapes=f"T={rows} K={k} N={n} fp8/{_DT_NAMES[shapes.dtype]}",
        build_inputs=inputs,
        kernel_fn=linear_fp8.linear_fp8,
        reference=linear_fp8.linear_fp8_ref,
        tolerance="float32_matmul" if shapes.dtype == "float32" else "bfloat16_matmul",
        min_hbm_bytes=(rows * k + rows * n) * dt.itemsize + k * n + 4 * scales,
        min_macs=rows * k * n,
        calls_per_layer=per_layer if shapes.fp8 else 0,
        calls_per_step=per_step if shapes.fp8 else 0,
        lnc_grid=True,  # output blocks split over the programs (kernels/linear_fp8.py, "Grid")
    )


def _projection(name: str, shapes: KernelShapes, rows: int, k: int, n: int, per_layer: int, per_step: int):
    """The bf16 case and the FP8 one of a projection; the step counts the one the checkpoint's format runs."""
    bf16 = _case(name, shapes, rows, k, n, 0 if shapes.fp8 else per_layer, 0 if shapes.fp8 else per_step)
    return [bf16, _fp8_case(name, shapes, rows, k, n, per_layer, per_step)]


def _silu_mul_case(shapes: KernelShapes, rows: int, per_layer: int, per_step: int) -> KernelCase:
    dt, inter = shapes.torch_dtype, shapes.intermediate
    return KernelCase(
        kernel="silu_mul",
        shapes=f"T={rows} I={inter} {_DT_NAMES[shapes.dtype]}",
        build_inputs=lambda rng: (torch.from_numpy(rng.standard_normal((rows, 2 * inter), dtype=np.float32)).to(dt),),
        kernel_fn=silu_mul.silu_mul,
        reference=silu_mul_ref,
        tolerance="float32" if shapes.dtype == "float32" else "bfloat16",
        min_hbm_bytes=3 * rows * inter * dt.itemsize,  # gate and up read, the product written
        calls_per_layer=per_layer,
        calls_per_step=per_step,
    )


def cases(shapes: KernelShapes, tokens: int) -> list[KernelCase]:
    s = shapes
    h, d = s.hidden, s.head_dim
    attention = 0 if attention_block_applies(s, tokens) else 1  # q/k/v and o inside attention_block_decode_fp8
    out = [
        *_projection("qkv_proj", s, tokens, h, (s.q_heads + 2 * s.kv_heads) * d, attention, 0),
        *_projection("o_proj", s, tokens, s.q_heads * d, h, attention, 0),
    ]
    dense_layers = s.layers - s.moe_layers
    if dense_layers and s.intermediate:
        # every layer dense (a dense model): per layer; some (mlp_only_layers): counted per step
        per_layer, per_step = (1, 0) if dense_layers == s.layers else (0, dense_layers)
        out += _projection("mlp_gate_up", s, tokens, h, 2 * s.intermediate, per_layer, per_step)
        out.append(_silu_mul_case(s, tokens, per_layer, per_step))
        out += _projection("mlp_down", s, tokens, s.intermediate, h, per_layer, per_step)
    # One sampled row per sequence: a decode step of `tokens` sequences, or the last token of one prefill.
    vocab_rows = -(-s.vocab // s.tp)
    out.append(_case("lm_head", s, tokens, h, vocab_rows, 0, 1, phase="decode"))
    out.append(_case("lm_head", s, 1, h, vocab_rows, 0, 1, phase="prefill"))
    return out
