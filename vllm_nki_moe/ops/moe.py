"""Expert ops: ``silu_mul``, ``moe_experts`` (routed SwiGLU experts) and ``moe_block`` (the decoder layer's MoE half:
residual add + RMSNorm, router, experts; a composite op).

Kernels: ``kernels/moe_decode.py`` (few tokens), ``kernels/moe_prefill.py`` (many tokens) and the fused
``kernels/moe_block.py``, all on ``kernels/moe_common.py``'s weight layout. The checkpoint loads into the model's layout
(``w13 [E, 2I, H]``, ``w2 [E, H, I]``, TP shards cut by the one table in ``models/weight_map.py``); right after loading,
the model converts them in place (``OpSet.prepare_weights``) to what the bound implementation reads: the kernels'
layout (H and I split into partition tiles, one contiguous run per partition per DMA) or ``cpu_fused_moe``'s prepacked
blocks, so one copy is kept. Callers holding model-layout tensors (tools, tests) get a converted copy made once per
tensor (``ops.weight_cache``).

Choice of kernel (trn2 cost model, Qwen3-30B-A3B TP=4, E=128, K=8; figures from
``python -m vllm_nki_moe.tools.kernel_check.cases_moe --select``): the decode kernel reads T*K experts, one per
(token, slot); the prefill kernel reads each used expert once but pays per-block gathers and scatters. Estimates
(decode vs prefill with 8-token blocks): T=1 53.5 vs 56.7 us, T=2 106.8 vs 106.3, T=4 213.4 vs 205.4, T=8 426.6
vs 361.2. So decode runs for one token (its K experts are distinct: nothing to share) and while T*K <= E/16,
prefill above, with the block size ``bucket_block_size`` picks for the bucket (least expected weight + padding
traffic), so no kernel shape depends on the routing.
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from vllm_nki_moe.ops import host
from vllm_nki_moe.ops.kernel_call import call_kernel, launch_grid, load_kernels
from vllm_nki_moe.ops.spec import KernelImpl, OpSpec, WeightLayouts
from vllm_nki_moe.ops.weight_cache import WeightCache

KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up [T, 2I]`` holding gate in the first half; returns ``[T, I]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Routed SwiGLU experts: ``sum_k w_k * down_e(silu(gate_e(x)) * up_e(x))`` for each token's experts ``e``.

    hidden ``[T, H]``; w13 ``[E, 2I, H]`` (gate rows then up rows); w2 ``[E, H, I]``; topk_* ``[T, K]``.
    Token slots are sorted by expert (stably) so each selected expert runs one matmul over a contiguous run of its
    tokens; unselected experts cost nothing. Routing weights are cast to the activation dtype before the multiply, as
    Hugging Face does, and one ``index_add_`` over the expert-sorted slots adds each token's contributions in
    ascending expert order: Hugging Face's summation order, so float32 results match it bit for bit.
    """
    num_experts, top_k = w13.shape[0], topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    token_of_slot = order // top_k
    x_sorted = hidden.index_select(0, token_of_slot)
    y_sorted = torch.empty_like(x_sorted)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            end = start + count
            y_sorted[start:end] = F.linear(silu_mul(F.linear(x_sorted[start:end], w13[expert])), w2[expert])
            start = end
    y_sorted.mul_(topk_weights.reshape(-1)[order].to(hidden.dtype)[:, None])
    return torch.zeros_like(hidden).index_add_(0, token_of_slot, y_sorted)


def norm_and_route(impls: dict[str, Callable]) -> Callable:
    """The MoE half's first steps from the bound ops, shared by ``moe_block`` and ``moe_block_fp8``: ``(hidden,
    residual, norm_weight, eps, gate_weight, top_k, renormalize) -> (normed, new residual, topk_weights, topk_ids)``
    (residual add + RMSNorm, then the gate and router on the normed hidden)."""
    fused_add_rms_norm, router_gate_topk = impls["fused_add_rms_norm"], impls["router_gate_topk"]

    def run(hidden, residual, norm_weight, eps, gate_weight, top_k, renormalize):
        normed, residual = fused_add_rms_norm(hidden, residual, norm_weight, eps)
        return (normed, residual, *router_gate_topk(normed, gate_weight, top_k, renormalize))

    return run


def moe_block_sequence(impls: dict[str, Callable]) -> Callable:
    """The decoder layer's MoE half from the bound ops: residual add + RMSNorm, gate, router, experts.

    ``moe_block(hidden [T, H], residual [T, H], norm_weight [H], eps, gate_weight [E, H], w13 [E, 2I, H],
    w2 [E, H, I], top_k, renormalize) -> (experts' output [T, H], new residual [T, H])``; a backend with a fused
    kernel for it (``moe_block_decode``) uses that where it applies and this sequence elsewhere.
    """
    route, experts = norm_and_route(impls), impls["moe_experts"]

    def moe_block(
        hidden: torch.Tensor,
        residual: torch.Tensor,
        norm_weight: torch.Tensor,
        eps: float,
        gate_weight: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        top_k: int,
        renormalize: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        normed, residual, topk_weights, topk_ids = route(
            hidden, residual, norm_weight, eps, gate_weight, top_k, renormalize
        )
        return experts(normed, w13, w2, topk_weights, topk_ids), residual

    return moe_block


# ---------------------------------------------------------------------------------------------------------------------
# The experts' one copy: the model's w13/w2 converted in place, once, to the layout the bound implementation reads

MODEL_LAYOUT, KERNEL_LAYOUT, PACKED_LAYOUT = "model", "kernel", "packed"
# id(tensor) -> (layout, weakref to the tensor, its model-layout shape): what prepare_experts made of a tensor.
_layouts: dict[int, tuple[str, weakref.ref, tuple[int, ...]]] = {}


def layout_of(t: torch.Tensor) -> str:
    """The layout ``t`` holds: ``kernel`` or ``packed`` if :func:`prepare_experts` converted it, else ``model``."""
    entry = _layouts.get(id(t))
    return entry[0] if entry is not None and entry[1]() is t else MODEL_LAYOUT


def expert_dims(w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, int, int]:
    """``(E, I, H)`` of the experts whatever layout they hold (``w13 [E, 2I, H]`` in the model's)."""
    entry = _layouts.get(id(w13))
    shape = entry[2] if entry is not None and entry[1]() is w13 else tuple(w13.shape)
    return shape[0], shape[1] // 2, shape[2]


def _adopt(t: torch.Tensor, converted: torch.Tensor, layout: str) -> None:
    """Swap ``t``'s data for ``converted`` (the old storage is freed) and remember the layout."""
    shape = tuple(t.shape)
    t.data = converted
    _layouts[id(t)] = (layout, weakref.ref(t), shape)
    weakref.finalize(t, _layouts.pop, id(t), None)


def _convert_experts(w13: torch.Tensor, w2: torch.Tensor, convert: Callable, layout: str) -> None:
    if layout_of(w13) != MODEL_LAYOUT or layout_of(w2) != MODEL_LAYOUT:
        raise ValueError(f"prepare_experts: the experts already hold the {layout_of(w13)} layout; convert once")
    new13, new2 = convert(w13.detach(), w2.detach())
    _adopt(w13, new13, layout)
    _adopt(w2, new2, layout)


def prepare_experts_for_kernels(w13: torch.Tensor, w2: torch.Tensor) -> None:
    """In place: the kernels' layout (``moe_common.experts_kernel_layout``) where the kernels take these weights;
    otherwise they stay as they are and the op says why at its first call (or falls back, under ``auto``)."""
    probe = w13.new_empty(1, w13.shape[2])
    ids = torch.zeros(1, 1, dtype=torch.int64)
    if _moe_experts_supports(probe, w13, w2, ids.float(), ids) is None:
        _convert_experts(w13, w2, load_kernels("moe_common").experts_kernel_layout, KERNEL_LAYOUT)


def prepare_experts_for_host(w13: torch.Tensor, w2: torch.Tensor) -> None:
    """In place: ``cpu_fused_moe``'s prepacked layout (:func:`pack_experts`) where it takes these weights."""
    if moe_experts_unsupported(w13.new_empty(1, w13.shape[2]), w13, w2) is None:
        _convert_experts(w13, w2, pack_experts, PACKED_LAYOUT)


def prepare_experts_unchanged(w13: torch.Tensor, w2: torch.Tensor) -> None:
    """The references read the model's layout: nothing to do."""


def _in_model_layout(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-layout copies of kernel-layout experts (a fallback's per-call conversion; it logs that it runs)."""
    if layout_of(w13) == KERNEL_LAYOUT:
        return load_kernels("moe_common").experts_model_layout(w13.detach(), w2.detach())
    if layout_of(w13) == PACKED_LAYOUT:
        raise ValueError("moe_experts: the experts are prepacked for cpu_fused_moe; no other implementation reads them")
    return w13, w2


def moe_experts_any_layout(hidden, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """:func:`moe_experts` for weights in any layout: the fallback of a kernel binding."""
    return moe_experts(hidden, *_in_model_layout(w13, w2), topk_weights, topk_ids)


# ---------------------------------------------------------------------------------------------------------------------
# Host fast path (ops.host): vLLM's CPU fused MoE

# cpu_fused_moe's portable "vec" grouped GEMM: output and reduction dims in multiples of 32 (vLLM's
# CPUUnquantizedExperts.output_alignment, vllm/model_executor/layers/fused_moe/experts/cpu_moe.py).
MOE_ALIGNMENT = 32
MOE_ISA = "vec"


def silu_mul_host(gate_up: torch.Tensor) -> torch.Tensor:
    """:func:`silu_mul` through ``torch.ops._C.silu_and_mul``."""
    if gate_up.dtype not in host.C_DTYPES or (gate_up.shape[-1] // 2) % host.VEC_ALIGNMENT:
        host.log_once(
            f"silu_mul: gate_up {gate_up.dtype}, width={gate_up.shape[-1]}; the C++ op takes halves in multiples of "
            f"{host.VEC_ALIGNMENT}; runs ops.moe.silu_mul"
        )
        return silu_mul(gate_up)
    if gate_up.numel() == 0:
        return silu_mul(gate_up)
    out = torch.empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2, dtype=gate_up.dtype, device=gate_up.device)
    torch.ops._C.silu_and_mul(out, gate_up.contiguous())
    return out


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


# Packed copies of (w13, w2), rebuilt when either is another tensor, moved to other storage, or changed in place
# through autograd-visible ops (the version counter; the model bumps it when it loads expert weights).
_packed_experts = WeightCache(fingerprint=False)


def moe_experts_unsupported(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> str | None:
    """Why ``cpu_fused_moe`` cannot take these operands (naming the limit and value), or None."""
    if not host.same_dtype(hidden, w13, w2):
        return f"hidden {hidden.dtype} / w13 {w13.dtype} / w2 {w2.dtype}; one of {', '.join(map(str, host.C_DTYPES))}"
    if hidden.shape[-1] % MOE_ALIGNMENT:
        return f"hidden={hidden.shape[-1]}; cpu_fused_moe needs a multiple of {MOE_ALIGNMENT}"
    return None


def moe_experts_host(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """:func:`moe_experts` through vLLM's CPU fused MoE (``torch.ops._C.cpu_fused_moe``, prepacked weights)."""
    packed = layout_of(w13) == PACKED_LAYOUT
    if packed and hidden.dtype != w13.dtype:
        raise ValueError(f"moe_experts: hidden.dtype={hidden.dtype}; the experts were prepacked as {w13.dtype}")
    reason = None if packed else moe_experts_unsupported(hidden, w13, w2)
    if reason is not None or hidden.shape[0] == 0:
        if reason is not None:
            host.log_once(f"moe_experts: {reason}; runs ops.moe.moe_experts")
        return moe_experts(hidden, w13, w2, topk_weights, topk_ids) if not packed else torch.zeros_like(hidden)
    # Prepared by the model (prepare_experts_for_host): the one packed copy; other callers: packed once, cached.
    packed13, packed2 = (w13, w2) if packed else _packed_experts.get(pack_experts, w13, w2)
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


# ---------------------------------------------------------------------------------------------------------------------
# NKI kernels (kernels/moe_decode.py, moe_prefill.py, moe_block.py)

DECODE_SLOTS_PER_EXPERT = 1 / 16  # decode while T*K <= E * this, or T == 1 (see module docstring)
PREFILL_BLOCK_STEP = 8  # block sizes a multiple of this: at most PMAX / 8 = 16 kernel shapes per token count
MAX8_MIN_EXPERTS, MAX8_MAX_EXPERTS, MAX8_MAX_K = 8, 512, 8  # moe_block_decode's Limits (max8 reads 8..; one tile)

_kernel_weights = WeightCache()


def use_decode(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether ``moe_experts`` runs the decode kernel (else prefill) for these sizes (module docstring)."""
    if num_tokens > load_kernels("moe_decode").MAX_DECODE_TOKENS:
        return False
    return num_tokens == 1 or num_tokens * top_k <= num_experts * DECODE_SLOTS_PER_EXPERT


def expected_blocks(num_tokens: int, top_k: int, num_experts: int, block_size: int) -> float:
    """``E[sum_e ceil(count_e / B)]`` when each token picks its K experts uniformly at random: an expert's count is
    Binomial(T, K / E) (tokens choose independently; each picks expert e with probability K / E)."""
    counts = torch.arange(num_tokens + 1, dtype=torch.float64)
    p = min(1.0, top_k / num_experts)
    if p >= 1.0:
        pmf = (counts == num_tokens).double()
    else:
        pmf = (
            math.lgamma(num_tokens + 1)
            - torch.lgamma(counts + 1)
            - torch.lgamma(num_tokens - counts + 1)
            + counts * math.log(p)
            + (num_tokens - counts) * math.log1p(-p)
        ).exp()
    return float((pmf * torch.ceil(counts / block_size)).sum()) * num_experts


@functools.lru_cache(maxsize=256)
def bucket_block_size(num_tokens: int, top_k: int, num_experts: int, intermediate: int) -> int:
    """Block size for ``moe_prefill`` at a bucket's sizes: a multiple of PREFILL_BLOCK_STEP in [STEP, PMAX].

    Routing must not decide a compiled kernel's shapes, so B depends on the bucket alone: the one with the least
    expected HBM traffic under uniform routing (:func:`expected_blocks`). Each used block reads its expert's weights
    (3 * H * I elements) and gathers, then scatter-adds B token rows, padding included (3 * B * H), so the traffic
    is proportional to ``blocks * (I + B)``; ties go to the smaller B. Skewed routing uses more blocks than expected;
    the table's worst-case row count (``moe_prefill.max_blocks``) still holds them all.
    """
    pmax = load_kernels("limits").PMAX
    costs = {
        b: expected_blocks(num_tokens, top_k, num_experts, b) * (intermediate + b)
        for b in range(PREFILL_BLOCK_STEP, pmax + 1, PREFILL_BLOCK_STEP)
    }
    least = min(costs.values())
    return min(b for b, cost in costs.items() if cost <= least * (1 + 1e-12))


def _moe_experts_supports(hidden, w13, w2, topk_weights, topk_ids) -> str | None:
    if hidden.dtype not in KERNEL_DTYPES:
        return f"hidden.dtype={hidden.dtype}; the kernels take bfloat16 or float32"
    if w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        return f"w13.dtype={w13.dtype}, w2.dtype={w2.dtype}; must equal hidden.dtype={hidden.dtype}"
    layout = layout_of(w13)
    if layout == PACKED_LAYOUT:
        return "the experts are prepacked for cpu_fused_moe (prepare_experts_for_host); the kernels cannot read them"
    if hidden.dim() != 2 or (layout == MODEL_LAYOUT and (w13.dim() != 3 or w2.dim() != 3)):
        return f"hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}; must be 2-D, 3-D, 3-D"
    pmax = load_kernels("limits").PMAX
    H = hidden.shape[1]
    E, inter, w_hidden = expert_dims(w13, w2)
    if w_hidden != H:
        return f"hidden.shape[1]={H}; the experts' hidden size is {w_hidden}"
    for what, n in (("H", H), ("I", inter)):
        tiles = -(-n // pmax)
        if n % tiles:
            return f"{what}={n}; must split into ceil({what}/{pmax})={tiles} equal partition tiles"
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        return f"topk_ids.shape={tuple(topk_ids.shape)}; must be [T={hidden.shape[0]}, K]"
    return None


def _kernel_layout(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts in the kernels' layout: the model's one copy if it prepared them (prepare_experts_for_kernels),
    else converted once and cached (tools and tests that hold model-layout tensors)."""
    if layout_of(w13) == KERNEL_LAYOUT:
        return w13, w2
    return _kernel_weights.get(load_kernels("moe_common").experts_kernel_layout, w13, w2)


def _moe_experts_kernel(backend: str, hidden, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    T = hidden.shape[0]
    if T == 0:
        return torch.zeros_like(hidden)
    moe_decode, moe_prefill = load_kernels("moe_decode"), load_kernels("moe_prefill")
    (E, inter, _), K = expert_dims(w13, w2), topk_ids.shape[1]
    w13k, w2k = _kernel_layout(w13, w2)
    x = hidden.contiguous()
    weights = topk_weights.float().contiguous()
    if use_decode(T, K, E):
        ids = topk_ids.to(torch.int32).contiguous()
        # the selected experts split over the logical core's physical cores (kernels/moe_decode.py, "Grid")
        return call_kernel(backend, moe_decode.moe_decode, x, w13k, w2k, weights, ids, grid=launch_grid(backend))
    block = bucket_block_size(T, K, E, inter)
    meta = moe_prefill.prefill_block_metadata(topk_ids, weights, E, block)
    # the blocks interleaved over the physical cores (kernels/moe_prefill.py, "Grid")
    return call_kernel(backend, moe_prefill.moe_prefill, x, w13k, w2k, *meta, grid=launch_grid(backend))


def fused_block_applies(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether ``moe_block`` runs the fused decode kernel at these sizes (else the ops in sequence)."""
    return (
        use_decode(num_tokens, top_k, num_experts)
        and MAX8_MIN_EXPERTS <= num_experts <= MAX8_MAX_EXPERTS
        and top_k <= MAX8_MAX_K
    )


def fused_block_reason(hidden, residual, norm_weight, gate_weight, num_experts: int, top_k: int) -> str | None:
    """Why a fused MoE block (``moe_block`` or ``moe_block_fp8``) does not apply to these arguments (sizes, dtypes),
    or None; the experts' own limits are the caller's to check."""
    T = hidden.shape[0]
    if not fused_block_applies(T, top_k, num_experts):
        return (
            f"T={T}, E={num_experts}, top_k={top_k}; the fused block is a decode kernel (T=1 or T*top_k <= E/16) "
            f"with {MAX8_MIN_EXPERTS} <= E <= {MAX8_MAX_EXPERTS} and top_k <= {MAX8_MAX_K}"
        )
    if residual.dtype != hidden.dtype or norm_weight.dtype != hidden.dtype or gate_weight.dtype != hidden.dtype:
        return f"dtypes {residual.dtype}, {norm_weight.dtype}, {gate_weight.dtype}; must equal hidden's {hidden.dtype}"
    return None


def _moe_block_supports(hidden, residual, norm_weight, eps, gate_weight, w13, w2, top_k, renormalize) -> str | None:
    """Where the fused decode block applies; elsewhere ``moe_block`` runs as separate ops (not an error)."""
    reason = fused_block_reason(hidden, residual, norm_weight, gate_weight, expert_dims(w13, w2)[0], top_k)
    ids = torch.zeros(hidden.shape[0], top_k, dtype=torch.int32)
    return reason or _moe_experts_supports(hidden, w13, w2, ids.float(), ids)


def _silu_mul_supports(gate_up: torch.Tensor) -> str | None:
    if gate_up.dtype not in KERNEL_DTYPES:
        return f"gate_up.dtype={gate_up.dtype}; the kernel takes bfloat16 or float32"
    if gate_up.dim() < 1 or gate_up.numel() == 0 or gate_up.shape[-1] % 2:
        return f"gate_up.shape={tuple(gate_up.shape)}; the kernel needs rows of an even, non-zero width [..., 2I]"
    return None


def _silu_mul_kernel(backend: str, gate_up: torch.Tensor) -> torch.Tensor:
    rows = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
    out = call_kernel(backend, load_kernels("silu_mul").silu_mul, rows)
    return out.view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


def _moe_block_kernel(backend: str, hidden, residual, norm_weight, eps, gate_weight, w13, w2, top_k, renormalize):
    moe_common, moe_block = load_kernels("moe_common"), load_kernels("moe_block")
    w13k, w2k = _kernel_layout(w13, w2)
    if gate_weight.t().is_contiguous():  # prepared (router.prepare_gate_for_kernels): [HP, KT, E] is a view
        router_w = moe_common.router_kernel_layout(gate_weight)
    else:
        router_w = _kernel_weights.get(moe_common.router_kernel_layout, gate_weight)
    return call_kernel(
        backend,
        moe_block.moe_block_decode,
        hidden.contiguous(),
        residual.contiguous(),
        norm_weight.contiguous(),
        router_w,
        w13k,
        w2k,
        float(eps),
        int(top_k),
        bool(renormalize),
        grid=launch_grid(backend),  # experts split over the physical cores (kernels/moe_block.py, "Grid")
    )


SPECS = (
    OpSpec("silu_mul", silu_mul, silu_mul_host, KernelImpl(_silu_mul_kernel, _silu_mul_supports)),
    # the reference loops over the experts in use (a host read of the routing): opaque under torch.compile
    OpSpec(
        "moe_experts",
        moe_experts,
        moe_experts_host,
        KernelImpl(_moe_experts_kernel, _moe_experts_supports),
        traceable=False,
        weights=WeightLayouts(prepare_experts_for_host, prepare_experts_for_kernels, moe_experts_any_layout),
    ),
    OpSpec("moe_block", kernel=KernelImpl(_moe_block_kernel, _moe_block_supports), compose=moe_block_sequence),
)
