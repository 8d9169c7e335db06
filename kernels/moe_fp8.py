"""Routed SwiGLU experts with block-scaled FP8 weights, for decode: the selected experts' FP8 bytes streamed
straight into the Tensor Engine, the block scales applied to the fp32 PSUM results and to the activations.

FP8 format on trn2. Checkpoints store ``float8_e4m3fn`` (max 448); trn2 computes on ``float8_e4m3`` (IEEE-style,
max 240) and its compiler rejects F8E4M3FN operands on Trn1/Trn2 (neuronx-cc error NCC_EVRF051; native on Trn3).
``fp8_experts_kernel_layout`` therefore halves every weight and doubles its scale on the host, once at load: exact
except that e4m3fn values below 2^-6 with an odd last mantissa bit round to even (at most 2^-10 of a scale, next to
448 for each block's largest weight). The kernel takes the bytes as uint8 (torch has no IEEE e4m3 dtype) and views
them as ``nl.float8_e4m3``.

Layout (host-made, ``fp8_experts_kernel_layout``). Hidden is split ``h = kt * 128 + p``: contraction tile ``kt`` is
exactly scale block ``kt`` (the bf16 kernels' ``h = p * KT + kt`` would mix 16 blocks in every tile). The expert
intermediate I (per rank) is split into IT chunks of IP rows (``i = c * IP + q``), as in ``moe_common``:

- ``w13 [E, IT, 128, KT, 2*IP]`` uint8: ``w13[e, c, p, kt, g*IP + q] = W13[e, g*I + c*IP + q, kt*128 + p]``;
- ``s13 [E, IT, IP, 2, KT]`` fp32: the scale of row ``g*I + c*IP + q`` in hidden block ``kt`` (the model keeps a scale
  row per weight row, ``ops.fp8``, so a rank's rows may start mid-block);
- ``w2 [E, IT, IP, H]`` uint8: ``w2[e, c, q, kt*128 + p] = W2[e, kt*128 + p, c*IP + q]``;
- ``s2 [E, IT, IP, KT]`` fp32: the scale of column ``c*IP + q`` in hidden (output) block ``kt``.

Numerics: gate/up per hidden block in fp32 PSUM, each block's partial sum times its scale, summed in fp32;
``silu(gate) * up`` in fp32, rounded to the activation dtype; times the down scales of its column (rounded again);
down accumulated in fp32 PSUM; the routing-weighted sum over the K experts in fp32, rounded once. bf16 activations
meet the FP8 weights in the Tensor Engine directly; float32 activations (the CPU test models) cannot be mixed with
FP8 operands, so their weight tiles are widened to fp32 in SBUF first (exact, and slower).
"""

import ml_dtypes
import nki
import nki.isa as nisa
import nki.language as nl
import numpy as np
import torch

from .grid import program_share
from .limits import PMAX, TOPK8, TOPK8_MAX_ELEMS, TOPK8_MIN_ELEMS, require
from .moe_block import MAX_ROUTER_EXPERTS, norm_route_ref, normalise, route, router_tiles
from .moe_common import DTYPES, load_routing, load_tile_major, split_tiles, store_tile_major

MAX_DECODE_TOKENS = PMAX
TRN2_FP8_MAX = 240.0  # float8_e4m3 (IEEE-style) largest finite value


# ----- host-side layout -----------------------------------------------------------------------------------------
def to_trn2_fp8(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``float8_e4m3fn`` values and their fp32 scales -> (IEEE ``float8_e4m3`` bytes as uint8, scales x 2): every
    value halved (|q| <= 448 becomes <= 224, inside e4m3's 240), every scale doubled."""
    half = (q.float() / 2).numpy().astype(ml_dtypes.float8_e4m3)
    return torch.from_numpy(half.view(np.uint8)), scales.float() * 2


def fp8_experts_kernel_layout(w13, w13_scale, w2, w2_scale) -> tuple[torch.Tensor, ...]:
    """The model's FP8 experts (``ops.fp8``: ``w13 [E, 2I, H]``, ``w13_scale [E, 2I, H/128]``, ``w2 [E, H, I]``,
    ``w2_scale [E, H/128, I]``) -> ``(w13k, s13k, w2k, s2k)`` in the kernel layout (module docstring)."""
    where = "fp8_experts_kernel_layout"
    E, I2, H = w13.shape
    require(H % PMAX == 0, where, f"H={H}; must be a multiple of {PMAX} (one scale block per contraction tile)")
    inter, KT = I2 // 2, H // PMAX
    require(tuple(w2.shape) == (E, H, inter), where, f"w2.shape={tuple(w2.shape)}; must be {(E, H, inter)}")
    require(tuple(w13_scale.shape) == (E, I2, KT), where, f"w13_scale {tuple(w13_scale.shape)}; must be {(E, I2, KT)}")
    require(
        tuple(w2_scale.shape) == (E, KT, inter), where, f"w2_scale {tuple(w2_scale.shape)}; must be {(E, KT, inter)}"
    )
    IP, IT = split_tiles(inter, where, "I")
    q13, s13 = to_trn2_fp8(w13, w13_scale)
    q2, s2 = to_trn2_fp8(w2, w2_scale)
    # w13[e, g*I + c*IP + q, kt*128 + p] -> [e, c, p, kt, g*IP + q]
    w13k = q13.reshape(E, 2, IT, IP, KT, PMAX).permute(0, 2, 5, 4, 1, 3).reshape(E, IT, PMAX, KT, 2 * IP)
    s13k = s13.reshape(E, 2, IT, IP, KT).permute(0, 2, 3, 1, 4).contiguous()  # [e, c, q, g, kt]
    # w2[e, kt*128 + p, c*IP + q] -> [e, c, q, kt*128 + p]
    w2k = q2.reshape(E, H, IT, IP).permute(0, 2, 3, 1).contiguous()
    s2k = s2.reshape(E, KT, IT, IP).permute(0, 2, 3, 1).contiguous()  # [e, c, q, kt]
    return w13k.contiguous(), s13k, w2k, s2k


# ----- kernel -----------------------------------------------------------------------------------------------------
@nki.jit
def moe_decode_fp8(hidden, w13, s13, w2, s2, topk_weights, topk_ids):
    """Routed experts with FP8 weights for a few tokens, reading only the selected experts' FP8 bytes and scales.

    Dimensions: T tokens (<= 128), H = KT * 128 hidden, E experts, K experts per token, I = IT * IP intermediate.

    Args:    hidden [T, H] bf16|fp32 HBM; w13, s13, w2, s2 HBM in the kernel layout (``fp8_experts_kernel_layout``);
             topk_weights [T, K] fp32 HBM; topk_ids [T, K] int32 HBM.
    Returns: [T, H] hidden's dtype in nl.shared_hbm.
    Tiling:  tokens to SBUF as [128, T, KT] (h = kt*128 + p; one DMA), ids [1, T*K], weights broadcast [128, T*K];
             per (token, slot) and chunk c: DMAs of the expert's w13 chunk [128, KT, 2*IP] (FP8) and s13 chunk
             [IP, 2, KT], w2 chunk [IP, H] (FP8) and s2 chunk [IP, KT], at the runtime offset of its id; Tensor:
             2 * KT gate/up GEMVs (FP8 stationary [128, IP], the token moving), one PSUM column per hidden block;
             Vector: columns x scales, summed over the blocks; Scalar silu; Vector silu * up, then h x s2 per output
             block; Tensor: KT down GEMVs (FP8 stationary [IP, 128], moving h x s2[:, kt]) accumulated over c;
             Vector: the routing-weighted fp32 sum; one cast and one store.
    Grid:    ``moe_decode_fp8[g]`` splits the T * K slots over the g programs, as ``moe_decode`` (``sendrecv`` of the
             fp32 partial sums; each program stores its share of the hidden blocks).
    Limits:  1 <= T <= 128; H % 128 == 0; IP <= 128; hidden bf16 or fp32; ids in [0, E).
    """
    T, H, E, IT, KT, IP = _check_fp8_experts("moe_decode_fp8", hidden, w13, s13, w2, s2)
    require(
        len(topk_ids.shape) == 2 and topk_ids.shape[0] == T,
        "moe_decode_fp8",
        f"topk_ids {tuple(topk_ids.shape)}; [T, K]",
    )
    K = topk_ids.shape[1]
    require(
        tuple(topk_weights.shape) == (T, K),
        "moe_decode_fp8",
        f"topk_weights {tuple(topk_weights.shape)}; must be [T, K]",
    )
    dt = hidden.dtype
    out = nl.ndarray((T, H), dtype=dt, buffer=nl.shared_hbm)
    x_sb = load_tile_major(hidden, T, KT)
    ids_sb, w_sb = load_routing(topk_weights, topk_ids, PMAX)
    acc = nl.ndarray((PMAX, T, KT), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=acc, value=0.0)
    _fp8_selected_experts(acc, x_sb, w13, s13, w2, s2, ids_sb, False, w_sb, T, K)
    store_tile_major(out, acc, T, KT, True)
    return out


@nki.jit
def moe_block_decode_fp8(hidden, residual, gamma, gate_weight_t, w13, s13, w2, s2, eps, top_k, norm_topk_prob):
    """The decode MoE block with FP8 experts in one call: residual add, RMSNorm, router, the selected FP8 experts.

    Computes what ``moe_block_decode`` computes (same rounding points, same routing and ties), with the experts of
    ``moe_decode_fp8``. Returns (out, r): the experts' weighted sum and the new residual.

    Dimensions: T tokens (<= 128), H = KT * 128 hidden, E experts, K = top_k, I = IT * IP intermediate.

    Args:    hidden, residual [T, H] bf16|fp32 HBM; gamma [H] HBM (hidden's dtype); gate_weight_t [H, E] HBM
             (hidden's dtype; the router weight transposed, the view ``router.prepare_gate_for_kernels`` keeps);
             w13, s13, w2, s2 in the FP8 kernel layout (``fp8_experts_kernel_layout``); eps float; top_k int;
             norm_topk_prob bool.
    Returns: (out [T, H], r [T, H]), hidden's dtype, in nl.shared_hbm.
    Tiling:  hidden split h = kt * 128 + p everywhere (the FP8 layout's: contraction tile kt is scale block kt):
             hidden, residual, gamma and the router weight ([128, KT, E]: rows h of gate_weight_t) to SBUF in that
             split, one DMA each; Vector: r = hidden + residual, stored; ``moe_block.normalise`` (RMSNorm) and
             ``moe_block.route`` (logits, softmax, max8 top-k, renormalisation, weights on every partition); then the
             selected FP8 experts as ``moe_decode_fp8`` (ids straight from nc_find_index8's SBUF tile as DMA offsets).
    Grid:    ``moe_block_decode_fp8[g]``: every program computes the norm and the router, then the slots split as
             ``moe_decode_fp8``'s grid; r and out stored by hidden-tile shares.
    Limits:  1 <= T <= 128; H % 128 == 0; 8 <= E <= 512; 1 <= top_k <= 8; hidden, residual, gamma, gate_weight_t
             share a dtype (bf16 or fp32); the experts as ``moe_decode_fp8``.
    """
    T, H, KT, K = check_moe_block_fp8(
        "moe_block_decode_fp8", hidden, residual, gamma, gate_weight_t, w13, s13, w2, s2, top_k
    )
    dt = hidden.dtype
    out = nl.ndarray((T, H), dtype=dt, buffer=nl.shared_hbm)
    r_out = nl.ndarray((T, H), dtype=dt, buffer=nl.shared_hbm)
    x_sb, res_sb = load_tile_major(hidden, T, KT), load_tile_major(residual, T, KT)
    acc, _ = moe_block_fp8_partial(x_sb, res_sb, gamma, gate_weight_t, w13, s13, w2, s2, eps, K, norm_topk_prob, r_out)
    store_tile_major(out, acc, T, KT, True)
    return out, r_out


def check_moe_block_fp8(where: str, hidden, residual, gamma, gate_weight_t, w13, s13, w2, s2, top_k):
    """``moe_block_decode_fp8``'s argument checks (named errors); returns (T, H, KT, top_k)."""
    T, H, E, IT, KT, IP = _check_fp8_experts(where, hidden, w13, s13, w2, s2)
    dt = hidden.dtype
    require(
        tuple(residual.shape) == (T, H) and residual.dtype == dt,
        where,
        f"residual={tuple(residual.shape)} {residual.dtype}; must be [{T}, {H}] {dt}",
    )
    require(
        tuple(gamma.shape) == (H,) and gamma.dtype == dt, where, f"gamma={tuple(gamma.shape)} {gamma.dtype}; [{H}] {dt}"
    )
    require(
        len(gate_weight_t.shape) == 2
        and gate_weight_t.shape[0] == H
        and gate_weight_t.shape[1] == E
        and gate_weight_t.dtype == dt,
        where,
        f"gate_weight_t={tuple(gate_weight_t.shape)} {gate_weight_t.dtype}; must be [{H}, {E}] {dt}",
    )
    require(
        TOPK8_MIN_ELEMS <= E <= min(MAX_ROUTER_EXPERTS, TOPK8_MAX_ELEMS),
        where,
        f"E={E}; must be {TOPK8_MIN_ELEMS}..{MAX_ROUTER_EXPERTS} (max8 input; one moving tile of logits)",
    )
    K = int(top_k)
    require(1 <= K <= TOPK8, where, f"top_k={top_k}; must be 1..{TOPK8} (max8 returns 8 values)")
    return T, H, KT, K


def moe_block_fp8_partial(
    x_sb, res_sb, gamma, gate_weight_t, w13, s13, w2, s2, eps, K: int, norm_topk_prob, r_out=None
):
    """The MoE half from SBUF: x_sb, res_sb [128, T, KT] (h = kt * 128 + p, activation dtype) are the attention's
    output and the residual. Returns (acc [128, T, KT] fp32: the experts' weighted sum over this program's slots, not
    yet added over the programs; r_sb = x + residual, the next residual, in x_sb's tile). ``r_out`` [T, H] (HBM) gets
    r_sb, each program its share, when given."""
    T, KT = x_sb.shape[1], x_sb.shape[2]
    H = KT * PMAX
    E = gate_weight_t.shape[1]
    r_sb = x_sb
    nisa.tensor_tensor(dst=r_sb, data1=r_sb, data2=res_sb, op=nl.add)  # rounded as the model's x + residual
    if r_out is not None:
        store_tile_major(r_out, r_sb, T, KT, False)
    gamma_sb = nl.ndarray((PMAX, KT), dtype=x_sb.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=gamma_sb, src=gamma.ap([[1, PMAX], [PMAX, KT]], offset=0))
    rw_tiles = router_tiles(gate_weight_t, [[E, PMAX], [1, E]], PMAX * E, KT, E)  # rows kt * 128 + p of [H, E]

    x_sb = normalise(r_sb, gamma_sb, eps, H, T)
    ids8, w_sb = route(x_sb, rw_tiles, T, K, bool(norm_topk_prob))
    acc = nl.ndarray((PMAX, T, KT), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=acc, value=0.0)
    _fp8_selected_experts(acc, x_sb, w13, s13, w2, s2, ids8, True, w_sb, T, K)
    return acc, r_sb


def widened(w_sb, dt):
    """The FP8 tile ``w_sb`` as the Tensor Engine takes it with ``dt`` activations: as is for bf16, widened to fp32
    (exact) for fp32 activations, which cannot meet FP8 operands."""
    if dt != nl.float32:
        return w_sb
    wide = nl.ndarray(w_sb.shape, dtype=dt, buffer=nl.sbuf)
    nisa.tensor_copy(dst=wide, src=w_sb)
    return wide


def _check_fp8_experts(where, hidden, w13, s13, w2, s2, max_tokens: int = MAX_DECODE_TOKENS):
    """hidden against the FP8 experts in the kernel layout; returns (T, H, E, IT, KT, IP)."""
    require(len(hidden.shape) == 2, where, f"hidden.shape={tuple(hidden.shape)}; must be [T, H]")
    T, H = hidden.shape
    require(1 <= T <= max_tokens, where, f"T={T}; must be 1..{max_tokens}")
    require(hidden.dtype in DTYPES, where, f"hidden.dtype={hidden.dtype}; must be bfloat16 or float32")
    require(len(w13.shape) == 5, where, f"w13.shape={tuple(w13.shape)}; must be [E, IT, 128, KT, 2*IP]")
    E, IT, P, KT, IP2 = w13.shape
    IP = IP2 // 2
    require(P == PMAX and KT * PMAX == H, where, f"w13.shape={tuple(w13.shape)}; needs [E, IT, 128, {H // PMAX}, 2*IP]")
    require(
        tuple(s13.shape) == (E, IT, IP, 2, KT), where, f"s13.shape={tuple(s13.shape)}; must be {(E, IT, IP, 2, KT)}"
    )
    require(tuple(w2.shape) == (E, IT, IP, H), where, f"w2.shape={tuple(w2.shape)}; must be {(E, IT, IP, H)}")
    require(tuple(s2.shape) == (E, IT, IP, KT), where, f"s2.shape={tuple(s2.shape)}; must be {(E, IT, IP, KT)}")
    require(w13.dtype == nl.uint8 and w2.dtype == nl.uint8, where, "w13/w2 must be uint8 (float8_e4m3 bytes)")
    return T, H, E, IT, KT, IP


def _fp8_selected_experts(acc, x_sb, w13, s13, w2, s2, ids, ids_token_rows: bool, w_sb, T: int, K: int) -> None:
    """acc[:, t, :] += sum_k weight(t, k) * expert_{id(t, k)}(x[t]) for FP8 experts, this program's share of the
    T * K slots (``moe_decode_fp8``'s Tiling). ``ids``: [1, T*K] (slot s in column s) or, with ``ids_token_rows``,
    [T, >= K] (token t on partition t, nc_find_index8's tile); w_sb [128, T*K] fp32."""
    dt = x_sb.dtype
    E, IT, P, KT, IP2 = w13.shape
    IP = IP2 // 2
    H = KT * PMAX
    w13f, w2f = w13.view(nl.float8_e4m3), w2.view(nl.float8_e4m3)
    chunk13, chunk2 = PMAX * KT * IP2, IP * H
    first, last = program_share(T * K)
    for s in range(first, last):
        t = s // K
        eid = ids[t : t + 1, s - t * K : s - t * K + 1] if ids_token_rows else ids[0:1, s : s + 1]
        y_ps = nl.ndarray((PMAX, KT), dtype=nl.float32, buffer=nl.psum)
        for c in range(IT):
            w13_sb = nl.ndarray((PMAX, KT, IP2), dtype=nl.float8_e4m3, buffer=nl.sbuf)
            nisa.dma_copy(
                dst=w13_sb,
                src=w13f.ap([[KT * IP2, PMAX], [IP2, KT], [1, IP2]], offset=c * chunk13, scalar_offset=eid),
            )
            s13_sb = nl.ndarray((IP, 2, KT), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(
                dst=s13_sb,
                src=s13.ap([[2 * KT, IP], [KT, 2], [1, KT]], offset=c * IP * 2 * KT, scalar_offset=eid),
            )
            w2_sb = nl.ndarray((IP, H), dtype=nl.float8_e4m3, buffer=nl.sbuf)
            nisa.dma_copy(dst=w2_sb, src=w2f.ap([[H, IP], [1, H]], offset=c * chunk2, scalar_offset=eid))
            s2_sb = nl.ndarray((IP, KT), dtype=nl.float32, buffer=nl.sbuf)
            nisa.dma_copy(dst=s2_sb, src=s2.ap([[KT, IP], [1, KT]], offset=c * IP * KT, scalar_offset=eid))
            w13_mm, w2_mm = widened(w13_sb, dt), widened(w2_sb, dt)
            # gate/up: one PSUM column per hidden block, then x scale, summed over the blocks
            gu_ps = nl.ndarray((IP, 2, KT), dtype=nl.float32, buffer=nl.psum)
            for g in range(2):
                for kt in range(KT):
                    nisa.nc_matmul(
                        dst=gu_ps[:, g, kt : kt + 1],
                        stationary=w13_mm[:, kt, g * IP : (g + 1) * IP],
                        moving=x_sb[:, t, kt : kt + 1],
                    )
            scaled = nl.ndarray((IP, 2, KT), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=scaled, data1=gu_ps, data2=s13_sb, op=nl.multiply)
            gu = nl.ndarray((IP, 2), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_reduce(dst=gu, op=nl.add, data=scaled, axis=2)
            gate = nl.ndarray((IP, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.activation(dst=gate, op=nl.silu, data=gu[:, 0:1])
            h_sb = nl.ndarray((IP, 1), dtype=dt, buffer=nl.sbuf)  # rounded as the reference rounds h
            nisa.tensor_tensor(dst=h_sb, data1=gate, data2=gu[:, 1:2], op=nl.multiply)
            h32 = nl.ndarray((IP, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_copy(dst=h32, src=h_sb)
            hs = nl.ndarray((IP, KT), dtype=dt, buffer=nl.sbuf)  # h x the down scale of each output block
            nisa.tensor_scalar(dst=hs, data=s2_sb, op0=nl.multiply, operand0=h32)
            for kt in range(KT):
                nisa.nc_matmul(
                    dst=y_ps[:, kt : kt + 1],
                    stationary=w2_mm[:, kt * PMAX : (kt + 1) * PMAX],
                    moving=hs[:, kt : kt + 1],
                    accumulate=c > 0,
                )
        nisa.scalar_tensor_tensor(
            dst=acc[:, t, :], data=y_ps, op0=nl.multiply, operand0=w_sb[:, s : s + 1], op1=nl.add, operand1=acc[:, t, :]
        )


def trn2_fp8_values(q: torch.Tensor) -> torch.Tensor:
    """trn2 FP8 bytes (uint8, IEEE ``float8_e4m3``) -> their values as fp32."""
    return torch.from_numpy(q.numpy().view(ml_dtypes.float8_e4m3).astype(np.float32))


def fp8_experts_model_layout(w13k, s13k, w2k, s2k) -> tuple[torch.Tensor, ...]:
    """Inverse of ``fp8_experts_kernel_layout`` up to the format: ``(w13 [E, 2I, H], w13_scale [E, 2I, H/128],
    w2 [E, H, I], w2_scale [E, H/128, I])`` with the trn2 values as fp32 (halved) and the scales as stored (doubled),
    so value x scale is the model's weight."""
    E, IT, P, KT, IP2 = w13k.shape
    IP = IP2 // 2
    H, inter = KT * P, IT * IP
    w13 = trn2_fp8_values(w13k).reshape(E, IT, P, KT, 2, IP).permute(0, 4, 1, 5, 3, 2).reshape(E, 2 * inter, H)
    s13 = s13k.permute(0, 3, 1, 2, 4).reshape(E, 2 * inter, KT)
    w2 = trn2_fp8_values(w2k).permute(0, 3, 1, 2).reshape(E, H, inter)
    s2 = s2k.permute(0, 3, 1, 2).reshape(E, KT, inter)
    return w13, s13, w2, s2


def dequantized_experts(w13, s13, w2, s2) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel layout's experts as fp32 model-layout weights ``w13 [E, 2I, H]``, ``w2 [E, H, I]``: each trn2 FP8
    value times its block scale."""
    w13m, s13m, w2m, s2m = fp8_experts_model_layout(w13, s13, w2, s2)
    P = w13.shape[2]
    return w13m * s13m.repeat_interleave(P, dim=-1), w2m * s2m.repeat_interleave(P, dim=1)


def moe_decode_fp8_ref(hidden, w13, s13, w2, s2, topk_weights, topk_ids) -> torch.Tensor:
    """``moe_decode_fp8`` in fp32 torch from the kernel layout: each weight dequantized (trn2 FP8 value x its scale),
    h rounded to the activation dtype as in the kernel."""
    w13d, w2d = dequantized_experts(w13, s13, w2, s2)
    inter = w13d.shape[1] // 2
    x = hidden.float()
    out = torch.zeros_like(x)
    for t in range(hidden.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            gu = w13d[e] @ x[t]
            h = (torch.nn.functional.silu(gu[:inter]) * gu[inter:]).to(hidden.dtype).float()
            out[t] += topk_weights[t, k].float() * (w2d[e] @ h)
    return out.to(hidden.dtype)


def moe_block_decode_fp8_ref(hidden, residual, gamma, gate_weight_t, w13, s13, w2, s2, eps, top_k, norm_topk_prob):
    """``moe_block_decode_fp8`` in torch: ``moe_block``'s norm and router (``norm_route_ref``), then
    ``moe_decode_fp8_ref``; returns (out, r)."""
    x, r, weights, ids = norm_route_ref(hidden, residual, gamma, gate_weight_t.T, eps, top_k, norm_topk_prob)
    return moe_decode_fp8_ref(x, w13, s13, w2, s2, weights, ids), r
