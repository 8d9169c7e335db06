"""Kernel-check cases for ``kernels/rmsnorm.py`` and ``kernels/rope.py`` at one rank's shapes.

Per decoder layer: two fused residual-add + RMSNorms (input and post-attention layernorms; the first layer's plain
RMSNorm costs the same), the per-head q and k norms, and one RoPE of q and k.
"""

from __future__ import annotations

import numpy as np
import torch

from ..emulator import install

install()  # `import nki` in the kernels: the emulator unless the real package imports (then a no-op)

from ..kernels import rmsnorm, rope  # noqa: E402 - after install()
from ..ops_torch import rope_cos_sin_cache  # noqa: E402
from .registry import KernelCase  # noqa: E402
from .shapes import KernelShapes  # noqa: E402
from .tolerances import dtype_key  # noqa: E402

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
            calls_per_layer=2,
        ),
        _norm_case("rms_norm.q_norm", T * s.q_heads, D, s, 1),
        _norm_case("rms_norm.k_norm", T * s.kv_heads, D, s, 1),
    ]
    positions = min(s.max_positions, 1 << 16)  # cache rows built for the check; rows beyond are never gathered

    def rope_inputs(rng: np.random.Generator) -> tuple:
        q = _randn(rng, (T, s.q_heads * D), dt)
        k = _randn(rng, (T, s.kv_heads * D), dt)
        pos = torch.from_numpy(rng.integers(0, positions, size=T).astype(np.int32))
        return q, k, pos, rope_cos_sin_cache(D, positions, s.rope_theta)

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
        )
    )
    return out
