"""The MoE kernels' shared pieces: the experts' kernel layout (made on the host), the argument check, the
sub-kernels that stream selected experts, and the fp32 reference helpers.

Weight layout (the "kernel layout", produced on the host by ``experts_kernel_layout``, used by ``moe_decode``,
``moe_block`` and ``moe_prefill``). Hidden is split as ``h = p * KT + kt`` (``p`` < HP partitions, ``kt`` < KT tiles;
HP * KT = H, HP <= 128), the partition-major split nki-library's decode RMSNorm also emits, so a token's row loads
with one contiguous run of KT elements per partition. The expert intermediate is split into IT equal chunks of IP rows
(``i = c * IP + q``):

- ``w13 [E, IT, HP, KT, 2 * IP]``: ``w13[e, c, p, kt, g * IP + q] = W13[e, g * I + c * IP + q, p * KT + kt]`` for the
  model's ``W13 [E, 2I, H]`` (gate rows ``g = 0``, then up rows ``g = 1``). One (expert, chunk) is one DMA with
  KT * 2 * IP contiguous elements per partition (6 KiB at Qwen3-30B-A3B TP=4, 8 KiB at TP=1).
- ``w2 [E, IT, IP, H]``: ``w2[e, c, q, kt * HP + p] = W2[e, p * KT + kt, c * IP + q]`` for the model's
  ``W2 [E, H, I]``: the down projection transposed (I on partitions, for the contraction) with its output columns
  ordered kt-major, so the columns of output tile kt are contiguous. One (expert, chunk) is one DMA of H contiguous
  elements per partition (4 KiB at H = 2048).
- ``router_w [HP, KT, E]`` (``moe_block_decode``): ``router_w[p, kt, e] = Wr[e, p * KT + kt]`` for the model's gate
  weight ``Wr [E, H]``: 4 KiB contiguous per partition at Qwen3-30B-A3B sizes.

Numerics: gate/up and down accumulate in fp32 PSUM; ``silu(gate) * up`` is computed in fp32 and rounded once to the
weights' dtype (the down matmul's input dtype); each expert's output is scaled by its routing weight and summed over
the K experts in fp32, and the sum is rounded once to the output dtype. Hugging Face rounds to bf16 after every step
instead, hence the bf16 tolerance (``bfloat16_matmul``); with float32 inputs every step is fp32.
"""

import nki.isa as nisa
import nki.language as nl
import torch

from .grid import program_share, sum_over_programs
from .limits import PMAX, require

DTYPES = (nl.bfloat16, nl.float32)  # bf16 on hardware; fp32 for the float32 test models


# ----- host-side layout -----------------------------------------------------------------------------------------
def split_tiles(n: int, where: str, what: str) -> tuple[int, int]:
    """``(rows, tiles)``: ``tiles = ceil(n / PMAX)`` equal tiles of ``rows = n / tiles <= PMAX``; raises if uneven."""
    require(n >= 1, where, f"{what}={n}; must be >= 1")
    tiles = -(-n // PMAX)
    require(
        n % tiles == 0,
        where,
        f"{what}={n}; must split into ceil({what}/{PMAX})={tiles} equal partition tiles (a multiple of {tiles})",
    )
    return n // tiles, tiles


def experts_kernel_layout(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` in the kernel layout (module docstring); new tensors."""
    E, I2, H = w13.shape
    require(I2 % 2 == 0, "experts_kernel_layout", f"w13.shape[1]={I2}; must be 2 * I (gate rows then up rows)")
    inter = I2 // 2
    require(
        tuple(w2.shape) == (E, H, inter),
        "experts_kernel_layout",
        f"w2.shape={tuple(w2.shape)}; must be {(E, H, inter)}",
    )
    HP, KT = split_tiles(H, "experts_kernel_layout", "H")
    IP, IT = split_tiles(inter, "experts_kernel_layout", "I")
    # W13[e, g*I + c*IP + q, p*KT + kt] -> [e, c, p, kt, g, q]
    w13k = w13.reshape(E, 2, IT, IP, HP, KT).permute(0, 2, 4, 5, 1, 3).reshape(E, IT, HP, KT, 2 * IP)
    # W2[e, p*KT + kt, c*IP + q] -> [e, c, q, kt, p]
    w2k = w2.reshape(E, HP, KT, IT, IP).permute(0, 3, 4, 2, 1).reshape(E, IT, IP, H)
    return w13k.contiguous(), w2k.contiguous()


def experts_model_layout(w13k: torch.Tensor, w2k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``experts_kernel_layout``: back to ``w13 [E, 2I, H]``, ``w2 [E, H, I]``."""
    E, IT, HP, KT, IP2 = w13k.shape
    IP = IP2 // 2
    H, inter = HP * KT, IT * IP
    w13 = w13k.reshape(E, IT, HP, KT, 2, IP).permute(0, 4, 1, 5, 2, 3).reshape(E, 2 * inter, H)
    w2 = w2k.reshape(E, IT, IP, KT, HP).permute(0, 4, 3, 1, 2).reshape(E, H, inter)
    return w13.contiguous(), w2.contiguous()


def router_kernel_layout(router_w: torch.Tensor) -> torch.Tensor:
    """The model's router (gate) weight ``[E, H]`` as ``[HP, KT, E]`` (module docstring); a new tensor."""
    E, H = router_w.shape
    HP, KT = split_tiles(H, "router_kernel_layout", "H")
    return router_w.reshape(E, HP, KT).permute(1, 2, 0).contiguous()


# ----- argument checks --------------------------------------------------------------------------------------------
def check_experts(where: str, hidden, w13, w2, T_max: int) -> tuple[int, int, int, int, int, int, int]:
    """Validate hidden/w13/w2 against each other; returns (T, H, E, HP, KT, IP, IT)."""
    require(len(hidden.shape) == 2, where, f"hidden.shape={tuple(hidden.shape)}; must be [T, H]")
    T, H = hidden.shape
    require(1 <= T <= T_max, where, f"T={T}; must be 1..{T_max}")
    require(hidden.dtype in DTYPES, where, f"hidden.dtype={hidden.dtype}; must be bfloat16 or float32")
    require(len(w13.shape) == 5, where, f"w13.shape={tuple(w13.shape)}; must be [E, IT, HP, KT, 2*IP] (kernel layout)")
    E, IT, HP, KT, IP2 = w13.shape
    IP = IP2 // 2
    require(
        HP * KT == H and HP <= PMAX,
        where,
        f"w13.shape={tuple(w13.shape)}; HP*KT must equal H={H} with HP <= {PMAX} (experts_kernel_layout)",
    )
    require(
        IP2 % 2 == 0 and 1 <= IP <= PMAX,
        where,
        f"w13.shape[4]={IP2}; must be 2*IP with IP <= {PMAX} (experts_kernel_layout)",
    )
    require(
        tuple(w2.shape) == (E, IT, IP, H),
        where,
        f"w2.shape={tuple(w2.shape)}; must be {(E, IT, IP, H)} (experts_kernel_layout)",
    )
    require(
        w13.dtype == hidden.dtype and w2.dtype == hidden.dtype,
        where,
        f"w13.dtype={w13.dtype}, w2.dtype={w2.dtype}; must equal hidden.dtype={hidden.dtype} (matmul operands)",
    )
    return T, H, E, HP, KT, IP, IT


# ----- sub-kernels ------------------------------------------------------------------------------------------------
def load_rows_hp(dst, src, T: int, H: int, HP: int, KT: int) -> None:
    """dst [HP, T, KT] = src [T, H] with h = p * KT + kt: KT contiguous elements per partition and token."""
    nisa.dma_copy(dst=dst, src=src.ap([[KT, HP], [H, T], [1, KT]], offset=0))


def tile_major(t, T: int, KT: int):
    """HBM rows of ``t [T, H]`` as [128, T, KT] with h = kt * 128 + p (each hidden tile of 128 contiguous columns on
    the partitions: the layout of kernels whose weights split the hidden axis that way, e.g. NxD's and the FP8 one)."""
    return t.ap([[1, PMAX], [KT * PMAX, T], [PMAX, KT]], offset=0)


def load_tile_major(t, T: int, KT: int):
    """``t [T, H]`` (HBM) as an SBUF tile [128, T, KT] in ``tile_major``'s split (one DMA)."""
    tile = nl.ndarray((PMAX, T, KT), dtype=t.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=tile, src=tile_major(t, T, KT))
    return tile


def store_tile_major(out, tile, T: int, KT: int, partial: bool) -> None:
    """out [T, H] = tile [128, T, KT] (h = kt * 128 + p) rounded to out's dtype; ``partial``: the tile holds this
    program's fp32 partial sums, added over the grid's programs first. Each program stores its share of the hidden
    tiles."""
    if partial:
        sum_over_programs(tile)
    o_sb = nl.ndarray((PMAX, T, KT), dtype=out.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=o_sb, src=tile)
    k0, k1 = program_share(KT)
    if k1 > k0:
        H = KT * PMAX
        nisa.dma_copy(dst=out.ap([[1, PMAX], [H, T], [PMAX, k1 - k0]], offset=k0 * PMAX), src=o_sb[:, :, k0:k1])


def load_routing(topk_weights, topk_ids, P: int):
    """The decode kernels' routing in SBUF: (ids [1, T*K] int32, slot s = t * K + k in column s; weights [P, T*K]
    fp32, slot s's weight on every one of P partitions, by a stride-0 DMA)."""
    T, K = topk_ids.shape
    ids_sb = nl.ndarray((1, T * K), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=ids_sb, src=topk_ids.ap([[T * K, 1], [1, T * K]], offset=0))
    w_sb = nl.ndarray((P, T * K), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=w_sb, src=topk_weights.ap([[0, P], [1, T * K]], offset=0))
    return ids_sb, w_sb


def store_rows_hp(dst, src, T: int, H: int, HP: int, KT: int) -> None:
    """dst [T, H] (HBM) = src [HP, T, KT] (SBUF), the inverse of ``load_rows_hp``; under a launch grid each program
    stores its share of the partitions (the rows ``h = p * KT + kt`` of its partitions are contiguous per token)."""
    p0, p1 = program_share(HP)
    if p1 > p0:
        nisa.dma_copy(dst=dst.ap([[KT, p1 - p0], [H, T], [1, KT]], offset=p0 * KT), src=src[p0:p1])


def selected_experts(acc, x_sb, w13, w2, ids_sb, ids_token_rows: bool, w_sb, T: int, K: int) -> None:
    """acc[:, t, :] += sum_k weight(t, k) * expert_{id(t, k)}(x[t]), for every token t and slot k; under a launch
    grid, for this program's share of the T * K slots (``program_share``: each core reads half the selected experts'
    weights; ``sum_over_programs`` adds the partners' partial sums).

    acc [HP, T, KT] fp32 SBUF (h = p * KT + kt); x_sb [HP, T, KT] SBUF, weights' dtype; ids_sb int SBUF, either
    [1, T*K] (slot s = t * K + k in column s) or, with ``ids_token_rows``, [T, >= K] (token t on partition t);
    w_sb [HP, T*K] fp32 SBUF, slot s's routing weight on every partition of column s.

    Per slot and intermediate chunk c: one DMA of the expert's gate/up chunk and one of its down chunk (runtime
    offset = expert id); Tensor: 2 * KT gate/up matmuls (weights stationary [HP, IP], the token moving [HP, 1],
    fp32 PSUM accumulation over kt), then KT down matmuls (weights stationary [IP, HP], h moving [IP, 1]) accumulating
    over c into y [HP, KT]; Scalar: silu; Vector: silu * up (rounded to the weights' dtype), then acc += weight * y.
    """
    _, IT, HP, KT, IP2 = w13.shape
    IP = IP2 // 2
    H = HP * KT
    chunk13 = HP * KT * IP2  # elements of one (expert, chunk) of w13
    first, last = program_share(T * K)
    for s in range(first, last):
        t, k = divmod(s, K)
        eid = ids_sb[t : t + 1, k : k + 1] if ids_token_rows else ids_sb[0:1, s : s + 1]
        y_ps = nl.ndarray((HP, KT), dtype=nl.float32, buffer=nl.psum)
        for c in range(IT):
            w13_sb = nl.ndarray((HP, KT, IP2), dtype=w13.dtype, buffer=nl.sbuf)
            nisa.dma_copy(
                dst=w13_sb,
                src=w13.ap([[KT * IP2, HP], [IP2, KT], [1, IP2]], offset=c * chunk13, scalar_offset=eid),
            )
            w2_sb = nl.ndarray((IP, H), dtype=w2.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=w2_sb, src=w2.ap([[H, IP], [1, H]], offset=c * IP * H, scalar_offset=eid))
            gu_ps = nl.ndarray((IP, 2), dtype=nl.float32, buffer=nl.psum)  # column 0 gate, 1 up
            for g in range(2):
                for kt in range(KT):
                    nisa.nc_matmul(
                        dst=gu_ps[:, g : g + 1],
                        stationary=w13_sb[:, kt, g * IP : (g + 1) * IP],
                        moving=x_sb[:, t, kt : kt + 1],
                        accumulate=kt > 0,
                    )
            gate = nl.ndarray((IP, 1), dtype=nl.float32, buffer=nl.sbuf)
            nisa.activation(dst=gate, op=nl.silu, data=gu_ps[:, 0:1])
            h_sb = nl.ndarray((IP, 1), dtype=w2.dtype, buffer=nl.sbuf)
            nisa.tensor_tensor(dst=h_sb, data1=gate, data2=gu_ps[:, 1:2], op=nl.multiply)
            for kt in range(KT):
                nisa.nc_matmul(
                    dst=y_ps[:, kt : kt + 1],
                    stationary=w2_sb[:, kt * HP : (kt + 1) * HP],
                    moving=h_sb,
                    accumulate=c > 0,
                )
        nisa.scalar_tensor_tensor(
            dst=acc[:, t, :],
            data=y_ps,
            op0=nl.multiply,
            operand0=w_sb[:, s : s + 1],
            op1=nl.add,
            operand1=acc[:, t, :],
        )


def store_experts_sum(out, acc, T: int, H: int, HP: int, KT: int) -> None:
    """out [T, H] (HBM) = acc [HP, T, KT] fp32, summed over the launch grid's programs and rounded once to out's
    dtype (each program stores its share of the partitions)."""
    sum_over_programs(acc)
    o_sb = nl.ndarray((HP, T, KT), dtype=out.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=o_sb, src=acc)
    store_rows_hp(out, o_sb, T, H, HP, KT)


def experts_ref(hidden, w13m, w2m, topk_weights, topk_ids) -> torch.Tensor:
    T, K = topk_ids.shape
    tokens = torch.arange(T)[:, None].expand(T, K).reshape(-1)
    return slots_ref(hidden, w13m, w2m, tokens, topk_ids.reshape(-1).long(), topk_weights.reshape(-1))


def slots_ref(hidden, w13m, w2m, tokens, experts, weights, h_dtype=None) -> torch.Tensor:
    """out[tokens[j]] += weights[j] * expert_{experts[j]}(hidden[tokens[j]]) in fp32, h rounded to ``h_dtype``
    (default w2's dtype)."""
    x = hidden.float()
    out = torch.zeros_like(x)
    inter = w13m.shape[1] // 2
    for e in torch.unique(experts).tolist():
        sel = experts == e
        tok = tokens[sel]
        gu = x[tok] @ w13m[e].float().T
        h = (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]).to(h_dtype or w2m.dtype).float()
        out.index_add_(0, tok, (h @ w2m[e].float().T) * weights[sel].float()[:, None])
    return out.to(hidden.dtype)
