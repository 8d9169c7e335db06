"""Kernel-check cases for ``kernels/rmsnorm.py`` and ``kernels/rope.py`` at one rank's shapes.

Per decoder layer: two fused residual-add + RMSNorms (input and post-attention layernorms; the first layer's plain
RMSNorm costs the same), and ``qk_norm_rope`` (the per-head q/k norms and RoPE in one kernel, as the model calls it).
Where the fused MoE block runs (``ops.moe.fused_block_applies``) it does the post-attention norm itself, so
``fused_add_rms_norm`` counts once. The separate q_norm, k_norm and rope kernels are checked and costed but count 0
calls per layer (the model no longer calls them separately).

``python -m vllm_nki_moe.tools.kernel_check.cases_norms --layouts`` prints the cost-model figures behind the layout
choices (``kernels/rmsnorm.py`` H_LAYOUT_MAX_TOKEN_BYTES, ``kernels/rope.py`` QK_HEADS_MAX_TOKENS).
"""

from __future__ import annotations

import numpy as np
import torch

from nki_emulator import install

install()  # `import nki` in the kernels: the emulator unless the real package imports (then a no-op)

from vllm_nki_moe.kernels import rmsnorm, rope  # noqa: E402 - after install()
from vllm_nki_moe.ops.moe import fused_block_applies  # noqa: E402
from vllm_nki_moe.ops.rope import rope_cos_sin_cache  # noqa: E402
from vllm_nki_moe.tools.kernel_check.cases_attention import attention_block_applies  # noqa: E402
from vllm_nki_moe.tools.kernel_check.registry import KernelCase  # noqa: E402
from vllm_nki_moe.tools.kernel_check.shapes import KernelShapes  # noqa: E402
from vllm_nki_moe.tools.kernel_check.tolerances import dtype_key  # noqa: E402

_DT_NAMES = {"bfloat16": "bf16", "float32": "fp32"}


def _randn(rng: np.random.Generator, shape, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * scale).to(dtype)


def _weight(rng: np.random.Generator, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).to(dtype)


def _norm_case(name: str, rows: int, size: int, s: KernelShapes, calls: int) -> KernelCase:
    dt = s.torch_dtype
    item = dt.itemsize
    return KernelCase(
        kernel=name,
        shapes=f"rows={rows} H={size} {_DT_NAMES[s.dtype]}",
        build_inputs=lambda rng: (_randn(rng, (rows, size), dt), _weight(rng, size, dt), s.rms_eps),
        kernel_fn=rmsnorm.rms_norm,
        reference=rmsnorm.rms_norm_ref,
        tolerance=dtype_key(dt),
        min_hbm_bytes=2 * rows * size * item + size * item,
        calls_per_layer=calls,
    )


def cases(shapes: KernelShapes, tokens: int) -> list[KernelCase]:
    s, T = shapes, tokens
    dt = s.torch_dtype
    item = dt.itemsize
    H, D = s.hidden, s.head_dim
    dname = _DT_NAMES[s.dtype]
    out = [
        KernelCase(
            kernel="fused_add_rms_norm",
            shapes=f"T={T} H={H} {dname}",
            build_inputs=lambda rng: (_randn(rng, (T, H), dt), _randn(rng, (T, H), dt), _weight(rng, H, dt), s.rms_eps),
            kernel_fn=rmsnorm.fused_add_rms_norm,
            reference=rmsnorm.fused_add_rms_norm_ref,
            tolerance=dtype_key(dt),
            min_hbm_bytes=4 * T * H * item + H * item,
            # the MoE block's fused norm and the FP8 attention block's each take one
            calls_per_layer=(1 if fused_block_applies(T, s.top_k, s.experts) else 2) - attention_block_applies(s, T),
        ),
    ]
    if s.qk_norm:  # as separate norms (counted inside qk_norm_rope in the model)
        out += [
            _norm_case("rms_norm.q_norm", T * s.q_heads, D, s, 0),
            _norm_case("rms_norm.k_norm", T * s.kv_heads, D, s, 0),
        ]
    positions = min(s.max_positions, 1 << 16)  # cache rows built for the check; rows beyond are never gathered

    def rope_inputs(rng: np.random.Generator) -> tuple:
        q = _randn(rng, (T, s.q_heads * D), dt)
        k = _randn(rng, (T, s.kv_heads * D), dt)
        pos = torch.from_numpy(rng.integers(0, positions, size=T).astype(np.int32))
        return q, k, pos, rope_cos_sin_cache(D, positions, s.rope_theta)

    def qk_inputs(rng: np.random.Generator) -> tuple:
        q, k, pos, cache = rope_inputs(rng)
        return q, k, _weight(rng, D, dt), _weight(rng, D, dt), s.rms_eps, pos, cache

    out.append(
        KernelCase(
            kernel="qk_norm_rope",
            shapes=f"T={T} q={s.q_heads}x{D} k={s.kv_heads}x{D} {dname}",
            build_inputs=qk_inputs,
            kernel_fn=rope.qk_norm_rope,
            reference=rope.qk_norm_rope_ref,
            tolerance=dtype_key(dt),
            # as rope, plus the two weights
            min_hbm_bytes=2 * T * (s.q_heads + s.kv_heads) * D * item + T * 4 + T * D * 4 + 2 * D * item,
            calls_per_layer=1 if s.qk_norm and not attention_block_applies(s, T) else 0,
        )
    )
    out.append(
        KernelCase(
            kernel="rope",
            shapes=f"T={T} q={s.q_heads}x{D} k={s.kv_heads}x{D} {dname}",
            build_inputs=rope_inputs,
            kernel_fn=rope.rope,
            reference=rope.rope_ref,
            tolerance=dtype_key(dt),
            # q and k read and written, the positions read, one fp32 cache row gathered per token
            min_hbm_bytes=2 * T * (s.q_heads + s.kv_heads) * D * item + T * 4 + T * D * 4,
            calls_per_layer=0 if s.qk_norm else 1,  # Qwen3: inside qk_norm_rope; Llama: the layer's RoPE
        )
    )
    return out


def layout_table() -> str:
    """Cost-model estimates of both layouts of fused_add_rms_norm and qk_norm_rope at Qwen3-30B-A3B sizes."""
    from nki_emulator import run

    rng = np.random.default_rng(0)
    lines = ["fused_add_rms_norm H=2048: est us rows vs h"]
    for dt in (torch.bfloat16, torch.float32):
        for T in (1, 8, 16, 32, 48, 64, 96, 128):
            x, r, w = _randn(rng, (T, 2048), dt), _randn(rng, (T, 2048), dt), _weight(rng, 2048, dt)
            est = [
                run(rmsnorm.fused_add_rms_norm, x, r, w, 1e-6, layout=lay)[1].estimated_seconds for lay in ("rows", "h")
            ]
            lines.append(
                f"  {_DT_NAMES[str(dt).replace('torch.', '')]} T={T:<4} {est[0] * 1e6:6.2f} {est[1] * 1e6:6.2f}"
            )
    lines.append("qk_norm_rope head_dim=128: est us heads vs tokens")
    cache = rope_cos_sin_cache(128, 4096, 1e6)
    for dt in (torch.bfloat16, torch.float32):
        for tp, (hq, hk) in {1: (32, 4), 4: (8, 1), 8: (4, 1)}.items():
            for T in (1, 14, 32, 48, 64, 128):
                q, k = _randn(rng, (T, hq * 128), dt), _randn(rng, (T, hk * 128), dt)
                pos = torch.from_numpy(rng.integers(0, 4096, size=T).astype(np.int32))
                args = (q, k, _weight(rng, 128, dt), _weight(rng, 128, dt), 1e-6, pos, cache)
                est = [run(rope.qk_norm_rope, *args, layout=lay)[1].estimated_seconds for lay in ("heads", "tokens")]
                name = _DT_NAMES[str(dt).replace("torch.", "")]
                lines.append(f"  {name} TP={tp} T={T:<4} {est[0] * 1e6:6.2f} {est[1] * 1e6:6.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--layouts"]:
        sys.exit("usage: python -m vllm_nki_moe.tools.kernel_check.cases_norms --layouts")
    print(layout_table())
