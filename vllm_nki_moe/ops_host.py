"""The ``torch`` backend's fast path on a vLLM CPU build: the model's ops as vLLM's own CPU custom ops.

``ops_torch`` stays the plain-PyTorch reference (readable, Hugging Face-exact). Serving on CPU, its ~100 small torch
ops per layer and its per-expert GEMMs cost about twice the time of vLLM's own Qwen3-MoE, which calls one C++ op per
step of the layer. This module binds the same functions to the C++ ops that vLLM's CPU platform loads
(``torch.ops._C``: ``rms_norm``, ``rotary_embedding``, ``silu_and_mul``, ``cpu_fused_moe`` with weights prepacked by
``prepack_moe_weight``), with the ``ops_torch`` signatures, never mutating their inputs.

When it is used: ``ops.bind()`` (the backend from the environment, as the model binds it) for the ``torch`` backend
(also ``auto`` off Neuron) asks :func:`host_ops`, which returns the fast ops when vLLM's CPU custom ops are already
loaded in this process (vLLM's CPU platform loads them when vLLM's layers are imported, ``vllm/kernels/vllm_c.py``;
this module never imports ``vllm._C`` itself: the wrong ISA build dies with "Illegal instruction") and
``VLLM_NKI_MOE_HOST_OPS`` is not ``off``; else it logs why once and the plain reference runs. ``ops.bind("torch")``
named in code stays the plain reference unless called with ``host_ops=True``. Each fast op checks its inputs and
runs the ``ops_torch`` function for what the C++ op cannot take (a dtype it lacks, hidden size not a multiple of 32
for the fused MoE, ...), logging the reason once.

Numerics: the C++ ops compute the same functions with another rounding (vectorised sums, FMA): float32 results
differ from ``ops_torch`` by a few ulp (RMSNorm and RoPE up to ~1e-6 relative; the fused MoE up to ~2e-6 of the
output scale: another summation order over H and over the top-k experts, routing weights applied in fp32).
bfloat16 differs by up to 1 bf16 ulp (the C++ ops round once where Hugging Face rounds the normed value before
the weight multiply). Greedy tokens can therefore differ from Hugging Face's on a near-tie of the top two logits;
``VLLM_NKI_MOE_HOST_OPS=off`` runs the bit-exact reference.

Expert weights: ``cpu_fused_moe`` wants them prepacked (a blocked layout, same shape) and the intermediate size
padded to a multiple of 32 (zero rows/columns: exact). The pack is made on first use and cached per weight tensor
(:class:`_PackedExperts`), keyed by identity, storage and version counter; the model bumps the version when it loads
expert weights (``Qwen3MoeExperts.load_expert_weight``). It holds a second copy of the experts (the originals stay
for the reference path); a model-side hook that packs in place after loading would save that memory.
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable

import torch

from . import envs, ops_torch

logger = logging.getLogger(__name__)


# The vLLM CPU custom ops this module calls (csrc/cpu/torch_bindings.cpp of vLLM's CPU build).
REQUIRED_C_OPS = ("rms_norm", "rotary_embedding", "silu_and_mul", "prepack_moe_weight", "cpu_fused_moe")
# cpu_fused_moe's portable "vec" grouped GEMM: output and reduction dims in multiples of 32 (vLLM's
# CPUUnquantizedExperts.output_alignment, vllm/model_executor/layers/fused_moe/experts/cpu_moe.py).
MOE_ALIGNMENT = 32
MOE_ISA = "vec"
# rms_norm and silu_and_mul walk the last axis in 8-element vectors and reject other sizes (TORCH_CHECK in vLLM's
# csrc/cpu/layernorm.cpp; measured on this AVX2 build: 8, 16, 24... accepted, 2 and 4 rejected); 16 leaves room for a
# build with 16-wide vectors.
VEC_ALIGNMENT = 16
# rotary_embedding vectorises half a head; with a scalar tail (half not a multiple of its vector) the bfloat16 path
# crashed on this build (head_dim 24: segmentation fault), so the fast path takes head_dim in multiples of 32 only.
ROPE_HEAD_ALIGNMENT = 32
C_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info("vllm_nki_moe.ops_host: %s", message)


def _c_op(name: str):
    """``torch.ops._C.<name>`` if vLLM's CPU build has registered it in this process, else None."""
    try:
        return getattr(torch.ops._C, name)
    except (AttributeError, RuntimeError):
        return None


def unavailable_reason() -> str | None:
    """Why the fast path cannot be used in this process, or None if it can."""
    if envs.host_ops() == "off":
        return f"{envs.HOST_OPS_ENV}=off"
    missing = [name for name in REQUIRED_C_OPS if _c_op(name) is None]
    if missing:
        return (
            f"vLLM's CPU custom ops are not loaded (torch.ops._C lacks {', '.join(missing)}); they load with vLLM's "
            f"CPU platform (importing vLLM's layers)"
        )
    return None


def _same_dtype(*tensors: torch.Tensor) -> bool:
    dtype = tensors[0].dtype
    return dtype in C_DTYPES and all(t.dtype == dtype for t in tensors)


# ---------------------------------------------------------------------------------------------------------------------
# Norms, RoPE, SiLU


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``ops_torch.rms_norm`` through ``torch.ops._C.rms_norm`` (rows of the last axis; any leading shape)."""
    if not _same_dtype(x, weight) or x.shape[-1] % VEC_ALIGNMENT:
        _log_once(
            f"rms_norm: x {x.dtype} / weight {weight.dtype}, size={x.shape[-1]}; the C++ op takes equal dtypes and "
            f"sizes in multiples of {VEC_ALIGNMENT}; runs ops_torch.rms_norm"
        )
        return ops_torch.rms_norm(x, weight, eps)
    if x.numel() == 0:
        return ops_torch.rms_norm(x, weight, eps)
    rows = x.reshape(-1, x.shape[-1])  # a copy when x is not contiguous: the C++ op ignores strides
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    torch.ops._C.rms_norm(out, rows.contiguous(), weight.contiguous(), eps)
    return out.view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + x`` then RMSNorm; returns (normed, new residual), inputs untouched.

    (vLLM's ``fused_add_rms_norm`` C++ op works in place on both inputs; the caller's residual may be a tensor it
    still owns, e.g. the embeddings, so the sum is a new tensor and the norm is the out-of-place op.)
    """
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps), new_residual


class _CosSinCache:
    """The rope cache in the activation dtype (the C++ op wants them equal), converted once per cache and dtype."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, torch.dtype], tuple] = {}

    def get(self, cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if cache.dtype == dtype and cache.is_contiguous():
            return cache
        key = (id(cache), dtype)
        slot = self._cache.get(key)
        if slot is not None and slot[0]() is cache:
            return slot[1]
        converted = cache.detach().to(dtype).contiguous()
        self._cache[key] = (weakref.ref(cache), converted)
        weakref.finalize(cache, self._cache.pop, key, None)
        return converted


_cos_sin = _CosSinCache()


def _rope_in_place(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int
) -> None:
    """Neox RoPE of contiguous ``q [T, Hq*D]`` and ``k [T, Hk*D]`` we own, in place."""
    if positions.numel() and int(positions.max()) >= cos_sin_cache.shape[0]:  # the C++ op would read past the cache
        raise IndexError(
            f"ops_host.apply_rope: position={int(positions.max())}; must be < {cos_sin_cache.shape[0]} (cache rows)"
        )
    cache = _cos_sin.get(cos_sin_cache, q.dtype)
    torch.ops._C.rotary_embedding(positions.long(), q, k, head_dim, cache, True)


def _rope_supported(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int) -> str | None:
    if not _same_dtype(q, k):
        return f"q {q.dtype} / k {k.dtype}"
    if cos_sin_cache.shape[-1] != head_dim:
        return f"cos_sin_cache width={cos_sin_cache.shape[-1]}; rotary over the whole head_dim={head_dim} only"
    if head_dim % ROPE_HEAD_ALIGNMENT:
        return f"head_dim={head_dim}; the C++ op is used for multiples of {ROPE_HEAD_ALIGNMENT}"
    return None


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops_torch.apply_rope`` through ``torch.ops._C.rotary_embedding`` (neox) on fresh contiguous copies."""
    reason = _rope_supported(q, k, cos_sin_cache, head_dim)
    if reason is not None or q.numel() == 0:
        if reason is not None:
            _log_once(f"apply_rope: {reason}; runs ops_torch.apply_rope")
        return ops_torch.apply_rope(q, k, positions, cos_sin_cache, head_dim)
    q_out = q.clone(memory_format=torch.contiguous_format)
    k_out = k.clone(memory_format=torch.contiguous_format)
    _rope_in_place(q_out, k_out, positions, cos_sin_cache, head_dim)
    return q_out, k_out


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops_torch.qk_norm_rope``: per-head RMSNorm of q and k (``_C.rms_norm`` over ``[T*H, D]`` rows) then RoPE
    in place on those fresh outputs; q/k may be strided views of the fused qkv projection."""
    reason = _rope_supported(q, k, cos_sin_cache, head_dim) or (
        None if _same_dtype(q, q_weight, k_weight) else f"weights {q_weight.dtype}/{k_weight.dtype} vs q {q.dtype}"
    )
    if reason is not None or q.numel() == 0:
        if reason is not None:
            _log_once(f"qk_norm_rope: {reason}; runs ops_torch.qk_norm_rope")
        return ops_torch.qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos_sin_cache, head_dim)
    q_out = rms_norm(q.reshape(-1, head_dim), q_weight, eps).view(q.shape)
    k_out = rms_norm(k.reshape(-1, head_dim), k_weight, eps).view(k.shape)
    _rope_in_place(q_out, k_out, positions, cos_sin_cache, head_dim)
    return q_out, k_out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``ops_torch.silu_mul`` through ``torch.ops._C.silu_and_mul``."""
    if gate_up.dtype not in C_DTYPES or (gate_up.shape[-1] // 2) % VEC_ALIGNMENT:
        _log_once(
            f"silu_mul: gate_up {gate_up.dtype}, width={gate_up.shape[-1]}; the C++ op takes halves in multiples of "
            f"{VEC_ALIGNMENT}; runs ops_torch.silu_mul"
        )
        return ops_torch.silu_mul(gate_up)
    if gate_up.numel() == 0:
        return ops_torch.silu_mul(gate_up)
    out = torch.empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2, dtype=gate_up.dtype, device=gate_up.device)
    torch.ops._C.silu_and_mul(out, gate_up.contiguous())
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Experts


def _pad_intermediate(w13: torch.Tensor, w2: torch.Tensor, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad I to ``padded``: gate rows [0, I), up rows [padded, padded + I) of w13; columns of w2. Exact: a zero
    gate and up row gives silu(0) * 0 = 0, and its w2 column is zero."""
    num_experts, two_i, hidden = w13.shape
    inter = two_i // 2
    if padded == inter:
        return w13, w2
    new_w13 = w13.new_zeros(num_experts, 2 * padded, hidden)
    new_w13[:, :inter] = w13[:, :inter]
    new_w13[:, padded : padded + inter] = w13[:, inter:]
    new_w2 = w2.new_zeros(num_experts, hidden, padded)
    new_w2[:, :, :inter] = w2
    return new_w13, new_w2


def pack_experts(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cpu_fused_moe``'s weights: intermediate size padded to a multiple of 32, each tensor prepacked."""
    inter = w13.shape[1] // 2
    padded = -(-inter // MOE_ALIGNMENT) * MOE_ALIGNMENT
    w13, w2 = _pad_intermediate(w13.detach().contiguous(), w2.detach().contiguous(), padded)
    packed = []
    for w in (w13, w2):
        out = torch.empty_like(w)
        torch.ops._C.prepack_moe_weight(w, out, MOE_ISA)
        packed.append(out)
    return packed[0], packed[1]


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot change outside inference mode)
        return -1


class _PackedExperts:
    """Packed copies of (w13, w2), one per live w13 tensor, rebuilt when w13 or w2 is another tensor, moved to other
    storage, or changed in place through autograd-visible ops (``_version``; the model bumps it when loading)."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple] = {}

    def get(self, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (w13.data_ptr(), _version(w13), w2.data_ptr(), _version(w2))
        slot = self._cache.get(id(w13))
        if slot is not None and slot[0]() is w13 and slot[1]() is w2 and slot[2] == key:
            return slot[3]
        packed = pack_experts(w13, w2)
        fresh = slot is None or slot[0]() is not w13
        self._cache[id(w13)] = (weakref.ref(w13), weakref.ref(w2), key, packed)
        if fresh:
            weakref.finalize(w13, self._cache.pop, id(w13), None)
        return packed

    def clear(self) -> None:
        self._cache.clear()


_packed = _PackedExperts()


def moe_experts_unsupported(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> str | None:
    """Why ``cpu_fused_moe`` cannot take these operands (naming the limit and value), or None."""
    if not _same_dtype(hidden, w13, w2):
        return f"hidden {hidden.dtype} / w13 {w13.dtype} / w2 {w2.dtype}; one of {', '.join(map(str, C_DTYPES))}"
    if hidden.shape[-1] % MOE_ALIGNMENT:
        return f"hidden={hidden.shape[-1]}; cpu_fused_moe needs a multiple of {MOE_ALIGNMENT}"
    return None


def moe_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """``ops_torch.moe_experts`` through vLLM's CPU fused MoE (``torch.ops._C.cpu_fused_moe``, prepacked weights)."""
    reason = moe_experts_unsupported(hidden, w13, w2)
    if reason is not None or hidden.shape[0] == 0:
        if reason is not None:
            _log_once(f"moe_experts: {reason}; runs ops_torch.moe_experts")
        return ops_torch.moe_experts(hidden, w13, w2, topk_weights, topk_ids)
    packed13, packed2 = _packed.get(w13, w2)
    out = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    torch.ops._C.cpu_fused_moe(
        out,
        hidden.contiguous(),
        packed13,
        packed2,
        None,
        None,
        topk_weights.to(torch.float32).contiguous(),  # the op reads raw fp32 / int32 buffers, ignoring strides
        topk_ids.to(torch.int32).contiguous(),
        False,  # skip_weighted: the op applies the routing weights
        "silu",
        MOE_ISA,
    )
    return out


FAST_OPS: dict[str, Callable] = {
    "rms_norm": rms_norm,
    "fused_add_rms_norm": fused_add_rms_norm,
    "apply_rope": apply_rope,
    "qk_norm_rope": qk_norm_rope,
    "silu_mul": silu_mul,
    "moe_experts": moe_experts,
}


def host_ops() -> dict[str, Callable]:
    """The ops of the ``torch`` backend that have a fast path here (empty, with the reason logged once, when the
    fast path is unavailable). ``router_topk`` and attention stay ``ops_torch``'s."""
    reason = unavailable_reason()
    if reason is not None:
        _log_once(f"plain torch ops (ops_torch): {reason}")
        return {}
    _log_once(f"vLLM CPU custom ops for {', '.join(FAST_OPS)} (set {envs.HOST_OPS_ENV}=off for the plain reference)")
    return dict(FAST_OPS)
