"""Routed SwiGLU experts for prefill (many tokens): tokens grouped by expert into blocks, blockwise matmuls.

Torch ops before the kernel sort the T * K (token, expert) slots by expert and cut each expert's slots into blocks of
``block_size`` (``prefill_block_metadata``, as NxD's blockwise path does for nki-library's ``moe_cte``), into a table of
the worst-case block count for (T, K, E, B); an expert with no token gets no block, and the kernel's block loop is a
runtime loop (``nl.fori_loop``) over the blocks actually used, so the unused rows of the table cost nothing. Each block
reads its expert's weights once, gathers its tokens by indirect DMA, runs gate/up and down as real matmuls (tokens on
the moving side, up to 512 per instruction) and scatter-adds the weighted rows back into the zero-initialised output
with the DMA engines' read-modify-write.

Weights come in the kernel layout of ``moe_decode`` (``experts_kernel_layout``), so one converted copy serves both.

Numerics: fp32 PSUM accumulation; ``silu(gate) * up`` in fp32, rounded once to the weights' dtype; each expert's
row is scaled by its routing weight in fp32 and rounded to the output dtype, and the K contributions of a token are
added by the DMA engine in fp32 with the sum rounded to the output dtype after each add (bf16 output: as Hugging
Face's bf16 ``index_add_``; float32 output: fp32 throughout).
"""

import nki
import nki.isa as nisa
import nki.language as nl
import torch

from .grid import program_share
from .limits import GEMM_MOVING_FMAX, PMAX, PSUM_BANK_BYTES, require
from .moe_common import DTYPES, check_experts, experts_model_layout, slots_ref, split_tiles
from .views import sbuf_view

DEFAULT_BLOCK_SIZE = PMAX  # one gather / transpose / scatter sub-block per expert block
# Blocks larger than a partition tile are processed as sub-blocks of PMAX tokens (gather, transpose, down, scatter);
# gate/up take the whole block as one moving tile, so a block holds at most gemm_moving_fmax tokens.
MAX_BLOCK_SIZE = GEMM_MOVING_FMAX
MAX_PREFILL_TOKENS = 2**31 - 1 - MAX_BLOCK_SIZE  # token ids and their padding ids (T + slot) are int32


def max_blocks(num_tokens: int, top_k: int, num_experts: int, block_size: int) -> int:
    """Rows of the block table: sum over used experts of ceil(count / B) <= (T*K + min(E, T*K) * (B - 1)) / B."""
    slots = num_tokens * top_k
    return (slots + min(num_experts, slots) * (block_size - 1)) // block_size


def prefill_block_metadata(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block table for ``moe_prefill`` from the router's ``topk_ids``/``topk_weights [T, K]``, in tensor ops only.

    Returns (block_expert [NB] int32, block_tokens [NB, B] int32, block_weights [NB, B] fp32, num_blocks [1] int32)
    with NB = ``max_blocks(T, K, E, B)``. Blocks are in expert order; an expert's slots fill ceil(count / B) blocks
    in token order. Padding slots hold token id T + slot (out of range, distinct within a block) and weight 0; rows
    past ``num_blocks`` are padding blocks the kernel never visits (expert 0). Every shape depends on (T, K, E, B)
    alone and nothing is read back to the host, so the table is built inside a compiled graph, on the device.
    """
    T, K = topk_ids.shape
    B = int(block_size)
    nb = max_blocks(T, K, num_experts, B)
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    blocks_per_expert = (counts + B - 1) // B
    blocks_end = torch.cumsum(blocks_per_expert, 0)
    first_block = blocks_end - blocks_per_expert
    first_slot = torch.cumsum(counts, 0) - counts
    sorted_expert = flat[order]
    rank = torch.arange(flat.numel()) - first_slot[sorted_expert]
    block = first_block[sorted_expert] + rank // B
    pos = rank % B
    block_tokens = (T + torch.arange(B, dtype=torch.int64)).repeat(nb, 1)
    block_tokens[block, pos] = order // K
    block_weights = torch.zeros(nb, B, dtype=torch.float32)
    block_weights[block, pos] = topk_weights.reshape(-1).float()[order]
    # Row r belongs to the first expert whose blocks end after r; rows past the used ones are padding (expert 0).
    rows = torch.arange(nb)
    used = blocks_end[-1]
    block_expert = torch.searchsorted(blocks_end, rows, right=True)
    block_expert = torch.where(rows < used, block_expert, torch.zeros_like(block_expert))
    return (
        block_expert.to(torch.int32),
        block_tokens.to(torch.int32),
        block_weights,
        used.reshape(1).to(torch.int32),
    )


@nki.jit
def moe_prefill(hidden, w13, w2, block_expert, block_tokens, block_weights, num_blocks):
    """Routed experts over blocks of tokens grouped by expert: out[t] = sum over t's slots of w * expert(x[t]).

    Dimensions: T tokens, H hidden = HP * KT, E experts, I = IT * IP expert intermediate per rank, NB block-table
    rows, B block size (tokens per block), SB = min(B, 128) tokens per sub-block.

    Args:    hidden [T, H] bf16|fp32 HBM; w13 [E, IT, HP, KT, 2*IP], w2 [E, IT, IP, H] HBM, hidden's dtype
             (``experts_kernel_layout``); block_expert [NB] int32, block_tokens [NB, B] int32, block_weights [NB, B]
             fp32, num_blocks [1] int32 HBM (``prefill_block_metadata``).
    Returns: [T, H] hidden's dtype in nl.shared_hbm.
    Tiling:  out zeroed by DMA from one zero tile; then a runtime loop over the num_blocks used blocks (register
             from num_blocks). Per block: its expert id, token ids and weights to SBUF (DMAs at the loop register's
             offset); per sub-block of SB tokens, an indirect-DMA gather of the token rows [SB, H] (padding ids out
             of range: skipped, rows stay zero) and KT Tensor Engine transposes to xT [HP, KT, B] (H on partitions,
             h = p * KT + kt); per intermediate chunk c, one DMA of the expert's w13 chunk, gate and up as KT
             accumulating matmuls each (stationary weights [HP, IP], moving xT [HP, B]) into fp32 PSUM [IP, B],
             Scalar silu, Vector silu * up into h [IP, IT, B]; one DMA of the expert's w2 [IP, IT, H]; per sub-block
             the down matmuls (stationary h [IP, SB], moving w2 [IP, <= 512], IT-accumulating) into PSUM [SB, 512],
             Vector eviction times the routing weight into natural h order, and one DMA read-modify-write
             scatter-add of the [SB, H] rows into out (oob_mode=skip drops padding slots).
    Grid:    ``moe_prefill[g]`` (LNC=2: g = 2): program p takes blocks p, p + g, ... (the runtime loop's step), so
             each core reads about half the used experts' weights, and scatter-adds into its own zeroed partial
             output in shared HBM; after a ``core_barrier`` each program adds the partials for its share of the rows
             (Vector, rounded to the output dtype) and stores them.
    Limits:  T >= 1; hidden, w13, w2 share a dtype (bf16 or fp32); shapes as the kernel layout; B <= 128 or a
             multiple of 128 up to 512; block_tokens [NB, B] and block_weights [NB, B] match, block_expert [NB],
             num_blocks [1] <= NB; ids valid as ``prefill_block_metadata`` makes them (an expert id out of range
             fails its DMA; a token id in [0, T) may appear at most once per block).
    """
    check_experts("moe_prefill", hidden, w13, w2, MAX_PREFILL_TOKENS)
    out, partials, nb_reg, SB, NSUB = _begin(
        "moe_prefill", hidden, block_expert, block_tokens, block_weights, num_blocks
    )
    programs, pid = nl.num_programs(), nl.program_id(0)

    def block(i):
        _expert_block(partials[pid], hidden, w13, w2, block_expert, block_tokens, block_weights, i, SB, NSUB)

    nl.fori_loop(pid, nb_reg, block, step=programs)  # blocks interleaved over the programs
    _end(out, partials)
    return out


@nki.jit
def moe_prefill_nxdi(hidden, gate_up, down, block_expert, block_tokens, block_weights, num_blocks):
    """``moe_prefill`` on NxD Inference's own expert weights, for NKI 0.2 to 0.5 (the contest drop-in's context
    encoding; the harness compiles with NKI 0.3):
    ``gate_up [E, H, 2I]`` (the rank's gate columns, then its up columns) and ``down [E, I, H]``, as ``ExpertMLPsV2``
    holds them (``moe_nxdi`` module docstring). The same blocks and numerics; the runtime block loop is written
    ``for i in nl.dynamic_range(...)``, which ``nl.fori_loop`` replaces from NKI 0.6 on (0.6 deprecates it:
    nki/migration/index.rst, "Migrating from NKI 0.5.0 to NKI 0.6.0"); gate/up rows arrive as runs of IP elements,
    down rows whole, and the down output is already in natural h order. Limits as ``moe_prefill``, with hidden,
    gate_up and down sharing a dtype.
    """
    _check_nxdi_experts("moe_prefill_nxdi", hidden, gate_up, down)
    out, partials, nb_reg, SB, NSUB = _begin(
        "moe_prefill_nxdi", hidden, block_expert, block_tokens, block_weights, num_blocks
    )
    programs, pid = nl.num_programs(), nl.program_id(0)
    for i in nl.dynamic_range(pid, nb_reg, programs):  # blocks interleaved over the programs
        _expert_block(
            partials[pid], hidden, gate_up, down, block_expert, block_tokens, block_weights, i, SB, NSUB, True
        )
    _end(out, partials)
    return out


def _check_nxdi_experts(where, hidden, gate_up, down) -> None:
    require(len(hidden.shape) == 2, where, f"hidden.shape={tuple(hidden.shape)}; must be [T, H]")
    T, H = hidden.shape
    require(1 <= T <= MAX_PREFILL_TOKENS, where, f"T={T}; must be 1..{MAX_PREFILL_TOKENS}")
    require(hidden.dtype in DTYPES, where, f"hidden.dtype={hidden.dtype}; must be bfloat16 or float32")
    require(
        len(gate_up.shape) == 3 and gate_up.shape[1] == H and gate_up.shape[2] % 2 == 0,
        where,
        f"gate_up.shape={tuple(gate_up.shape)}; must be [E, H={H}, 2I] (NxD's layout)",
    )
    E, _, I2 = gate_up.shape
    require(tuple(down.shape) == (E, I2 // 2, H), where, f"down.shape={tuple(down.shape)}; must be {(E, I2 // 2, H)}")
    require(
        gate_up.dtype == hidden.dtype and down.dtype == hidden.dtype,
        where,
        f"gate_up {gate_up.dtype}, down {down.dtype}; must be hidden's {hidden.dtype}",
    )
    split_tiles(H, where, "H")
    split_tiles(I2 // 2, where, "I")


def moe_prefill_nxdi_ref(hidden, gate_up, down, block_expert, block_tokens, block_weights, num_blocks) -> torch.Tensor:
    """``moe_prefill_nxdi`` in fp32 torch: ``moe_prefill_ref`` on the model's [E, 2I, H] / [E, H, I]."""
    return _blocks_ref(
        hidden, gate_up.transpose(1, 2), down.transpose(1, 2), block_expert, block_tokens, block_weights, num_blocks
    )


def _begin(where, hidden, block_expert, block_tokens, block_weights, num_blocks):
    """Every form's start, after the caller checked hidden against its experts: the block table's checks, the
    output and per-program partials (this program's zeroed), the block count in a register. Returns (out, partials,
    nb_reg, SB, NSUB)."""
    T, H = hidden.shape
    require(len(block_tokens.shape) == 2, where, f"block_tokens.shape={tuple(block_tokens.shape)}; must be [NB, B]")
    NB, B = block_tokens.shape
    require(
        1 <= B <= PMAX or (B % PMAX == 0 and B <= MAX_BLOCK_SIZE),
        where,
        f"block_size={B}; must be 1..{PMAX} or a multiple of {PMAX} up to {MAX_BLOCK_SIZE} (gate/up moving tile)",
    )
    require(
        tuple(block_expert.shape) == (NB,) and block_expert.dtype == nl.int32,
        where,
        f"block_expert={tuple(block_expert.shape)} {block_expert.dtype}; must be [{NB}] int32",
    )
    require(block_tokens.dtype == nl.int32, where, f"block_tokens.dtype={block_tokens.dtype}; must be int32")
    require(
        tuple(block_weights.shape) == (NB, B) and block_weights.dtype == nl.float32,
        where,
        f"block_weights={tuple(block_weights.shape)} {block_weights.dtype}; must be [{NB}, {B}] float32",
    )
    require(
        tuple(num_blocks.shape) == (1,) and num_blocks.dtype == nl.int32,
        where,
        f"num_blocks={tuple(num_blocks.shape)} {num_blocks.dtype}; must be [1] int32",
    )
    dt = hidden.dtype
    SB = min(B, PMAX)
    NSUB = B // SB
    out = nl.ndarray((T, H), dtype=dt, buffer=nl.shared_hbm)
    programs, pid = nl.num_programs(), nl.program_id(0)
    # under a grid each program scatter-adds into its own partial output (two cores' read-modify-writes of one row
    # would race); the j-th shared-HBM allocation is the same tensor in every program, so each sees all partials
    partials = [out] if programs == 1 else [nl.ndarray((T, H), dtype=dt, buffer=nl.shared_hbm) for _ in range(programs)]
    mine = partials[pid]

    # zero-initialise this program's output (the scatter-adds accumulate into it)
    rows0 = min(T, PMAX)
    zero = nl.ndarray((rows0, H), dtype=dt, buffer=nl.sbuf)
    nisa.memset(dst=zero, value=0.0)
    for r0 in range(0, T, PMAX):
        n = min(PMAX, T - r0)
        nisa.dma_copy(dst=mine[r0 : r0 + n, :], src=zero[0:n, :])

    nb_sb = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=nb_sb, src=num_blocks.ap([[1, 1], [1, 1]], offset=0))
    nb_reg = nisa.register_alloc()
    nisa.register_load(nb_reg, nb_sb)

    return out, partials, nb_reg, SB, NSUB


def _end(out, partials) -> None:
    """Both loop forms' end: under a grid, wait for both partials, then each program sums its share of the rows."""
    if len(partials) > 1:
        nisa.core_barrier(data=partials[nl.program_id(0)], cores=(0, 1))  # both partials complete
        _sum_partials(out, partials, out.shape[0], out.shape[1])


def _sum_partials(out, partials, T: int, H: int) -> None:
    """out = partials[0] + partials[1] ...: each program adds its share of the rows (PMAX rows per tile, Vector)."""
    first, last = program_share(T)
    for r0 in range(first, last, PMAX):
        n = min(PMAX, last - r0)
        total = nl.ndarray((n, H), dtype=out.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=total, src=partials[0][r0 : r0 + n, :])
        for part in partials[1:]:
            other = nl.ndarray((n, H), dtype=out.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=other, src=part[r0 : r0 + n, :])
            nisa.tensor_tensor(dst=total, data1=total, data2=other, op=nl.add)
        nisa.dma_copy(dst=out[r0 : r0 + n, :], src=total)


def _expert_block(
    out, hidden, w13, w2, block_expert, block_tokens, block_weights, i, SB: int, NSUB: int, nxdi: bool = False
) -> None:
    """Block ``i`` (a loop register): gather, gate/up, silu * up, down, weight, scatter-add (see ``moe_prefill``).
    ``nxdi``: w13 / w2 are NxD's ``gate_up [E, H, 2I]`` / ``down [E, I, H]`` (``moe_prefill_nxdi``), else the kernel
    layout."""
    T, H = hidden.shape
    if nxdi:
        I2 = w13.shape[2]
        IP, IT = split_tiles(I2 // 2, "moe_prefill_nxdi", "I")
        HP, KT = split_tiles(H, "moe_prefill_nxdi", "H")
        IP2 = 2 * IP
    else:
        _, IT, HP, KT, IP2 = w13.shape
        IP = IP2 // 2
    B = SB * NSUB
    skip = nisa.oob_mode.skip

    eid, tok, wts = block_row(block_expert, block_tokens, block_weights, i, SB, NSUB)
    xT = gather_transposed(hidden, tok, HP, KT, SB, NSUB, blocked=False)

    # gate/up per intermediate chunk, h = silu(gate) * up with I on partitions
    h_sb = nl.ndarray((IP, IT, B), dtype=w2.dtype, buffer=nl.sbuf)
    chunk13 = HP * KT * IP2
    for c in range(IT):
        w13_sb = nl.ndarray((HP, KT, IP2), dtype=w13.dtype, buffer=nl.sbuf)
        if nxdi:  # rows h = p * KT + kt of gate_up, the chunk's gate columns then its up columns
            I2 = w13.shape[2]
            src = w13.ap([[KT * I2, HP], [I2, KT], [I2 // 2, 2], [1, IP]], offset=c * IP, scalar_offset=eid)
            nisa.dma_copy(dst=sbuf_view(w13_sb, [[IP2, KT], [IP, 2], [1, IP]]), src=src)
        else:
            nisa.dma_copy(
                dst=w13_sb, src=w13.ap([[KT * IP2, HP], [IP2, KT], [1, IP2]], offset=c * chunk13, scalar_offset=eid)
            )
        g_ps = nl.ndarray((IP, B), dtype=nl.float32, buffer=nl.psum)
        u_ps = nl.ndarray((IP, B), dtype=nl.float32, buffer=nl.psum)
        for kt in range(KT):
            nisa.nc_matmul(dst=g_ps, stationary=w13_sb[:, kt, 0:IP], moving=xT[:, kt, :], accumulate=kt > 0)
        for kt in range(KT):
            nisa.nc_matmul(dst=u_ps, stationary=w13_sb[:, kt, IP:IP2], moving=xT[:, kt, :], accumulate=kt > 0)
        gate = nl.ndarray((IP, B), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=gate, op=nl.silu, data=g_ps)
        nisa.tensor_tensor(dst=h_sb[:, c, :], data1=gate, data2=u_ps, op=nl.multiply)
        del g_ps, u_ps

    # down with tokens on partitions, weighted, back to natural h order, scatter-added into out
    w2_sb = nl.ndarray((IP, IT, H), dtype=w2.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=w2_sb, src=w2.ap([[H, IP], [IP * H, IT], [1, H]], offset=0, scalar_offset=eid))
    per_mm = max(1, GEMM_MOVING_FMAX // HP)  # output tiles kt per down matmul (moving free size <= 512)
    for s in range(NSUB):
        y_sb = nl.ndarray((SB, HP, KT), dtype=out.dtype, buffer=nl.sbuf)  # [token, p, kt] = natural h = p*KT + kt
        for kt0 in range(0, KT, per_mm):
            g = min(per_mm, KT - kt0)
            y_ps = nl.ndarray((SB, g * HP), dtype=nl.float32, buffer=nl.psum)  # columns kt-major: (kt, p)
            for c in range(IT):
                nisa.nc_matmul(
                    dst=y_ps,
                    stationary=h_sb[:, c, s * SB : (s + 1) * SB],
                    moving=w2_sb[:, c, kt0 * HP : (kt0 + g) * HP],
                    accumulate=c > 0,
                )
            # kernel layout: columns (kt, p) go to natural h = p * KT + kt; NxD's down is in natural h order already
            dst = (
                sbuf_view(y_sb, [[1, g * HP]], offset=kt0 * HP)
                if nxdi
                else sbuf_view(y_sb, [[1, g], [KT, HP]], offset=kt0)
            )
            nisa.tensor_scalar(dst=dst, data=y_ps, op0=nl.multiply, operand0=wts[:, s : s + 1])
        rows = out.ap([[H, SB], [1, H]], offset=0, vector_offset=tok[:, s : s + 1], indirect_dim=0)
        nisa.dma_compute(dst=rows, srcs=[rows, y_sb], reduce_op=nl.add, oob_mode=skip)


def block_row(block_expert, block_tokens, block_weights, i, SB: int, NSUB: int):
    """Row ``i`` (a loop register) of the block table in SBUF: (expert id [1, 1], token ids [SB, NSUB], routing
    weights [SB, NSUB]); slot ``s * SB + p`` on partition p, column s."""
    eid = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=eid, src=block_expert.ap([[1, 1], [1, 1]], offset=0, scalar_offset=i))
    tok = nl.ndarray((SB, NSUB), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=tok, src=block_tokens.ap([[1, SB], [SB, NSUB]], offset=0, scalar_offset=i))
    wts = nl.ndarray((SB, NSUB), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=wts, src=block_weights.ap([[1, SB], [SB, NSUB]], offset=0, scalar_offset=i))
    return eid, tok, wts


def gather_transposed(hidden, tok, HP: int, KT: int, SB: int, NSUB: int, blocked: bool):
    """The block's token rows gathered by indirect DMA and transposed to hidden-on-partitions: xT [HP, KT, B] with
    xT[p, kt, b] = x[token b, h], h = kt * HP + p (``blocked``: the FP8 scale blocks' split) or p * KT + kt. Padding
    ids (out of range) are skipped and read as zero."""
    H = hidden.shape[1]
    dt = hidden.dtype
    xT = nl.ndarray((HP, KT, SB * NSUB), dtype=dt, buffer=nl.sbuf)
    per_bank = max(1, PSUM_BANK_BYTES // (SB * _itemsize(dt)))  # transposes sharing one PSUM bank
    for s in range(NSUB):
        xg = nl.ndarray((SB, H), dtype=dt, buffer=nl.sbuf)
        # padding slots are skipped by the gather and must read as zero; on GpSimd (idle here), so the next block's
        # gather need not wait behind this block's Vector work
        nisa.memset(dst=xg, value=0.0, engine=nisa.engine.gpsimd)
        nisa.dma_copy(
            dst=xg,
            src=hidden.ap([[H, SB], [1, H]], offset=0, vector_offset=tok[:, s : s + 1], indirect_dim=0),
            oob_mode=nisa.oob_mode.skip,
        )
        for kt0 in range(0, KT, per_bank):
            g = min(per_bank, KT - kt0)
            tp_ps = nl.ndarray((HP, g, SB), dtype=dt, buffer=nl.psum)
            for j in range(g):
                kt = kt0 + j
                cols = xg[:, kt * HP : (kt + 1) * HP] if blocked else xg[:, kt:H:KT]
                nisa.nc_transpose(dst=tp_ps[:, j, :], data=cols)
            nisa.tensor_copy(dst=xT[:, kt0 : kt0 + g, s * SB : (s + 1) * SB], src=tp_ps)
    return xT


def _itemsize(dtype) -> int:
    return 2 if dtype == nl.bfloat16 else 4


def moe_prefill_ref(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    block_expert: torch.Tensor,
    block_tokens: torch.Tensor,
    block_weights: torch.Tensor,
    num_blocks: torch.Tensor,
) -> torch.Tensor:
    """``moe_prefill`` in plain fp32 torch over the used blocks' valid slots (h rounded to the weights' dtype)."""
    w13m, w2m = experts_model_layout(w13, w2)
    return _blocks_ref(hidden, w13m, w2m, block_expert, block_tokens, block_weights, num_blocks)


def _blocks_ref(hidden, w13m, w2m, block_expert, block_tokens, block_weights, num_blocks) -> torch.Tensor:
    """The used blocks' valid slots through ``slots_ref`` on the model's ``w13m [E, 2I, H]``, ``w2m [E, H, I]``."""
    tokens, experts, weights = used_slots(hidden.shape[0], block_expert, block_tokens, block_weights, num_blocks)
    return slots_ref(hidden, w13m, w2m, tokens, experts, weights)


def used_slots(T: int, block_expert, block_tokens, block_weights, num_blocks):
    """The block table's valid slots as flat (token ids, expert ids, routing weights): the used blocks' slots whose
    token id is below T (the rest is padding)."""
    n = int(num_blocks.reshape(-1)[0])
    tokens = block_tokens[:n].long()
    valid = tokens < T
    experts = block_expert[:n].long()[:, None].expand_as(tokens)
    return tokens[valid], experts[valid], block_weights[:n][valid]
