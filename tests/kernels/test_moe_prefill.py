"""kernels/moe_prefill.py (blockwise experts) vs its reference, the block table, limits; the moe_experts wrapper."""

from __future__ import annotations

import collections
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nki_emulator as emulator
from vllm_nki_moe import ops

emulator.install()

from vllm_nki_moe.kernels import moe_common as mc  # noqa: E402
from vllm_nki_moe.kernels import moe_prefill as mp  # noqa: E402

from vllm_nki_moe.ops import moe  # noqa: E402
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close  # noqa: E402

SEED = 0

# Qwen3-30B-A3B per tensor-parallel rank (config.json: hidden_size 2048, moe_intermediate_size 768, num_experts 128,
# num_experts_per_tok 8; TP shards the expert intermediate): name, H, I, E, K.
QWEN3_30B_A3B_TP1 = ("qwen3-30b-a3b-tp1", 2048, 768, 128, 8)
QWEN3_30B_A3B_TP4 = ("qwen3-30b-a3b-tp4", 2048, 192, 128, 8)
QWEN3_30B_A3B_TP8 = ("qwen3-30b-a3b-tp8", 2048, 96, 128, 8)

# Edge sizes: 1 token, a ragged count, PMAX - 1, PMAX + 1, several sub-blocks with a ragged tail.
TOKEN_COUNTS = (1, 5, 127, 129, 300)
BLOCK_SIZES = (8, 32, 128, 256)  # below a partition tile, one tile, two sub-blocks
SMALL = ("h200-i96", 200, 96, 16, 4)  # H and I not multiples of 128 (2 x 100 and 1 x 96 partition tiles)
TINY = ("tiny-model", 128, 64, 8, 2)  # the tiny test model's sizes
DTYPES = {torch.float32: "float32_matmul", torch.bfloat16: "bfloat16_matmul"}


def _experts(H, I, E, dtype):  # noqa: E741
    g = torch.Generator().manual_seed(SEED)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I**-0.5).to(dtype)
    return w13, w2


def _routing(T, E, K, experts=None, same_expert=None):
    """Distinct experts per token from ``experts`` (default all); ``same_expert`` in every token's first slot."""
    g = torch.Generator().manual_seed(SEED + 1)
    pool = torch.arange(E) if experts is None else torch.tensor(experts)
    rows = []
    for _ in range(T):
        row = pool[torch.randperm(len(pool), generator=g)[:K]].tolist()
        if same_expert is not None:
            row = ([same_expert] + [e for e in row if e != same_expert])[:K]
        rows.append(row)
    w = torch.rand(T, K, generator=g) + 0.1
    return (w / w.sum(-1, keepdim=True)).float(), torch.tensor(rows)


def _inputs(T, H, I, E, K, dtype, B, **routing):  # noqa: E741
    g = torch.Generator().manual_seed(SEED + 2)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13, w2 = _experts(H, I, E, dtype)
    w13k, w2k = mc.experts_kernel_layout(w13, w2)
    wts, ids = _routing(T, E, K, **routing)
    meta = mp.prefill_block_metadata(ids, wts, E, B)
    return (x, w13k, w2k, *meta), (w13, w2, wts, ids)


# ----- block table -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B", BLOCK_SIZES)
@pytest.mark.parametrize("T", TOKEN_COUNTS)
def test_prefill_block_metadata_places_every_slot_once_in_its_experts_blocks(T, B):
    E, K = 16, 4
    wts, ids = _routing(T, E, K)
    block_expert, tokens, weights, num_blocks = mp.prefill_block_metadata(ids, wts, E, B)
    n = int(num_blocks[0])
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    assert n == int(((counts + B - 1) // B).sum()) <= block_expert.shape[0] == mp.max_blocks(T, K, E, B)
    seen = set()
    for b in range(n):
        for j in range(B):
            t = int(tokens[b, j])
            if t >= T:  # padding: distinct out-of-range id, weight 0
                assert t == T + j and weights[b, j] == 0
                continue
            e = int(block_expert[b])
            k = ids[t].tolist().index(e)
            assert weights[b, j] == wts[t, k]
            seen.add((t, e))
    assert len(seen) == T * K


def test_prefill_block_metadata_gives_no_block_to_an_expert_without_tokens():
    wts, ids = _routing(40, 16, 2, experts=[1, 4, 9])
    block_expert, _, _, num_blocks = mp.prefill_block_metadata(ids, wts, 16, 32)
    assert set(block_expert[: int(num_blocks[0])].tolist()) == {1, 4, 9}


# ----- moe_prefill -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", TOKEN_COUNTS)
def test_moe_prefill_matches_ref(T, dtype):
    name, H, I, E, K = SMALL  # noqa: E741
    args, _ = _inputs(T, H, I, E, K, dtype, 32)
    assert_close(mp.moe_prefill(*args), mp.moe_prefill_ref(*args), DTYPES[dtype])


@pytest.mark.parametrize("B", BLOCK_SIZES)
def test_moe_prefill_matches_ref_for_each_block_size(B):
    name, H, I, E, K = TINY  # noqa: E741
    args, _ = _inputs(300, H, I, E, K, torch.float32, B)
    assert_close(mp.moe_prefill(*args), mp.moe_prefill_ref(*args), "float32_matmul")


def test_moe_prefill_matches_the_models_torch_experts_in_float32():
    name, H, I, E, K = SMALL  # noqa: E741
    args, (w13, w2, wts, ids) = _inputs(131, H, I, E, K, torch.float32, 16)
    assert_close(mp.moe_prefill(*args), moe.moe_experts(args[0], w13, w2, wts, ids), "float32_matmul")


def test_moe_prefill_skips_experts_without_tokens():
    name, H, I, E, K = TINY  # noqa: E741
    args, (_, _, _, ids) = _inputs(50, H, I, E, K, torch.float32, 16, experts=[2, 5, 6])
    out, rep = emulator.run(mp.moe_prefill, *args)
    assert_close(out, mp.moe_prefill_ref(*args), "float32_matmul")
    n = int(args[6][0])  # blocks of experts 2, 5 and 6 only
    assert n == sum(-(-int((ids == e).sum()) // 16) for e in (2, 5, 6))
    # weights of the visited blocks, their token gathers and scatter reads (16 rows of H fp32 each), metadata
    assert rep.hbm_read_bytes <= n * (3 * H * I * 4 + 2 * 16 * H * 4) + 50 * H * 4 + 10_000


def test_moe_prefill_handles_every_token_routed_to_the_same_expert():
    name, H, I, E, K = TINY  # noqa: E741
    args, (_, _, _, ids) = _inputs(129, H, I, E, K, torch.bfloat16, 128, same_expert=3)
    assert (ids == 3).any(dim=1).all()
    assert_close(mp.moe_prefill(*args), mp.moe_prefill_ref(*args), "bfloat16_matmul")


@pytest.mark.parametrize(
    "T,B,experts",
    [(50, 16, None), (1, 8, None), (129, 128, None), (40, 16, [3])],  # odd block count, 1 block, sub-blocks, one expert
)
def test_moe_prefill_on_two_programs_matches_ref_each_core_taking_every_other_block(T, B, experts):
    name, H, I, E, K = TINY  # noqa: E741
    routing = {} if experts is None else {"same_expert": experts[0]}
    args, _ = _inputs(T, H, I, E, K, torch.bfloat16, B, **routing)
    one, one_rep = emulator.run(mp.moe_prefill, *args)
    two, two_rep = emulator.run(mp.moe_prefill[2], *args)
    assert_close(two, mp.moe_prefill_ref(*args), "bfloat16_matmul")
    assert_close(two, one, "bfloat16_matmul")  # a token's contributions add in another order
    assert two_rep.num_programs == 2
    blocks = int(args[6][0])
    if blocks >= 4:  # the busier core does about half the work (its busiest engine's time; at these tiny sizes the
        # estimate itself is mostly the DMA fixed costs of each block's chain, which both programs pay)
        assert two_rep.engine_bound_seconds < 0.6 * one_rep.engine_bound_seconds, two_rep.format()
        assert two_rep.estimated_seconds < one_rep.estimated_seconds, two_rep.format()


@pytest.mark.parametrize("grid", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,B", [(129, 32), (128, 128), (5, 16)])
def test_moe_prefill_nxdi_reads_nxds_expert_layout_and_matches_ref(T, B, dtype, grid):
    """The contest drop-in's form: NxD's gate_up [E, H, 2I] / down [E, I, H] (moe_nxdi docstring), the NKI 0.3
    loop (nl.dynamic_range); same blocks as moe_prefill, so within its tolerance of the same reference."""
    from nki_emulator import language_rules

    name, H, I, E, K = SMALL  # noqa: E741
    args, (w13, w2, _, _) = _inputs(T, H, I, E, K, dtype, B)
    gate_up, down = w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()  # NxDI's conversion
    nxdi = (args[0], gate_up, down, *args[3:])
    out, _ = emulator.run(mp.moe_prefill_nxdi[grid] if grid > 1 else mp.moe_prefill_nxdi, *nxdi)
    assert_close(out, mp.moe_prefill_nxdi_ref(*nxdi), DTYPES[dtype])
    assert_close(out, mp.moe_prefill_ref(*args), DTYPES[dtype])
    assert language_rules.check(mp.moe_prefill_nxdi, "0.3") == []
    assert "fori_loop" in language_rules.check(mp.moe_prefill, "0.3")[0].format("0.3")


def test_moe_prefill_on_two_programs_halves_the_weight_traffic_per_core_at_qwen3_30b_a3b_tp8():
    name, H, I, E, K = QWEN3_30B_A3B_TP8  # noqa: E741
    args, _ = _inputs(37, H, I, E, K, torch.bfloat16, 8)
    one, one_rep = emulator.run(mp.moe_prefill, *args)
    two, two_rep = emulator.run(mp.moe_prefill[2], *args)
    assert_close(two, mp.moe_prefill_ref(*args), "bfloat16_matmul")
    # every used block's expert read once in all, plus each core's partial (zeroed, read back) and the sum's store
    partial = 37 * H * 2
    assert two_rep.hbm_read_bytes <= one_rep.hbm_read_bytes + 2 * partial + 10_000
    assert two_rep.estimated_seconds < 0.6 * one_rep.estimated_seconds, two_rep.format()


@pytest.mark.parametrize(
    "name,H,I,E,K",
    [
        QWEN3_30B_A3B_TP8,
        pytest.param(*QWEN3_30B_A3B_TP4, marks=pytest.mark.slow),
        pytest.param(*QWEN3_30B_A3B_TP1, marks=pytest.mark.slow),
    ],
)
def test_moe_prefill_matches_ref_at_qwen3_30b_a3b_rank_shapes(name, H, I, E, K):  # noqa: E741
    T = 37  # ragged; touches ~120 of the 128 experts
    args, _ = _inputs(T, H, I, E, K, torch.bfloat16, 8)  # 8-token blocks: most experts get one, a few two
    assert_close(mp.moe_prefill(*args), mp.moe_prefill_ref(*args), "bfloat16_matmul")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 70),
    H=st.sampled_from([24, 128, 192, 300]),
    I=st.sampled_from([16, 96, 192]),
    E=st.integers(2, 12),
    K=st.integers(1, 2),
    B=st.sampled_from([1, 8, 100, 128, 256]),
)
def test_moe_prefill_matches_ref_for_any_shape_and_block_size(T, H, I, E, K, B):  # noqa: E741
    args, _ = _inputs(T, H, I, E, K, torch.float32, B)
    assert_close(mp.moe_prefill(*args), mp.moe_prefill_ref(*args), "float32_matmul")


def _args(**over):
    args, _ = _inputs(6, 128, 64, 8, 2, torch.float32, 8)
    names = ("hidden", "w13", "w2", "block_expert", "block_tokens", "block_weights", "num_blocks")
    d = dict(zip(names, args))
    d.update(over)
    return [d[n] for n in names]


# Invalid cases, one per documented limit of moe_prefill: (id, overrides, message fragment).
PREFILL_INVALID = [
    ("block-size-200", {"block_tokens": torch.zeros(4, 200, dtype=torch.int32)}, "block_size=200"),
    ("block-size-640", {"block_tokens": torch.zeros(4, 640, dtype=torch.int32)}, "block_size=640"),
    ("tokens-int16", {"block_tokens": torch.zeros(8, 8, dtype=torch.int16)}, "block_tokens.dtype"),
    ("expert-table-length", {"block_expert": torch.zeros(2, dtype=torch.int32)}, "block_expert="),
    ("weights-shape", {"block_weights": torch.zeros(3, 4)}, "block_weights="),
    ("num-blocks-int64", {"num_blocks": torch.zeros(2, dtype=torch.int32)}, "num_blocks="),
    ("weights-dtype-differs", {"hidden": torch.zeros(6, 128, dtype=torch.bfloat16)}, "must equal hidden"),
    ("w2-wrong-shape", {"w2": torch.zeros(8, 1, 32, 128)}, "w2.shape"),
]


@pytest.mark.parametrize("case,over,match", PREFILL_INVALID, ids=[c[0] for c in PREFILL_INVALID])
def test_moe_prefill_rejects_invalid_arguments(case, over, match):
    args = _args(**over)
    with pytest.raises(ValueError, match=match):
        mp.moe_prefill(*args)


def test_moe_prefill_rejects_an_expert_id_out_of_range():
    args = _args()
    bad = args[3].clone()
    bad[0] = 8
    args[3] = bad
    with pytest.raises(ValueError, match="out of bounds"):
        mp.moe_prefill(*args)


# ----- the moe_experts op (ops/moe.py)  --------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 2, 3, 40])
def test_moe_experts_op_matches_torch_on_both_kernels(T):
    H, I, E, K = 128, 64, 8, 2  # noqa: E741 - the tiny model; T=1 runs the decode kernel, 2, 3 and 40 prefill
    opset = ops.bind("emulator")
    w13, w2 = (torch.nn.Parameter(w, requires_grad=False) for w in _experts(H, I, E, torch.float32))
    wts, ids = _routing(T, E, K)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(3))
    assert moe.use_decode(T, K, E) == (T == 1)
    out = opset.moe_experts(x, w13, w2, wts, ids)
    assert_close(out, moe.moe_experts(x, w13, w2, wts, ids), "float32_matmul")


def test_moe_experts_op_reconverts_weights_reloaded_in_place():
    H, I, E, K = 128, 64, 8, 2  # noqa: E741
    opset = ops.bind("emulator")
    w13, w2 = (torch.nn.Parameter(w, requires_grad=False) for w in _experts(H, I, E, torch.float32))
    wts, ids = _routing(1, E, K)
    x = torch.randn(1, H)
    opset.moe_experts(x, w13, w2, wts, ids)
    w13.data.mul_(-1.5)  # as a weight loader's .data copy_: no _version bump on the parameter
    assert_close(opset.moe_experts(x, w13, w2, wts, ids), moe.moe_experts(x, w13, w2, wts, ids), "float32_matmul")


def test_moe_experts_op_reports_unsplittable_hidden_size_as_unsupported():
    w13, w2 = torch.zeros(8, 128, 257), torch.zeros(8, 257, 64)
    reason = moe._moe_experts_supports(
        torch.zeros(1, 257), w13, w2, torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long)
    )
    assert reason is not None and reason.startswith("H=257")


def _expected_blocks_by_enumeration(T: int, K: int, E: int, B: int) -> float:
    """E[sum_e ceil(count_e / B)] over every routing where each token picks K distinct experts uniformly."""
    choices = list(itertools.combinations(range(E), K))
    total = 0.0
    for routing in itertools.product(choices, repeat=T):
        counts = collections.Counter(e for experts in routing for e in experts)
        total += sum(-(-c // B) for c in counts.values())
    return total / len(choices) ** T


@pytest.mark.parametrize("T, K, E", [(3, 2, 4), (4, 1, 3), (2, 3, 5), (2, 3, 3)])
@pytest.mark.parametrize("B", [1, 2, 3])
def test_expected_blocks_equals_the_average_over_every_routing(T, K, E, B):
    assert moe.expected_blocks(T, K, E, B) == pytest.approx(_expected_blocks_by_enumeration(T, K, E, B), rel=1e-9)


def test_bucket_block_size_is_the_least_expected_traffic_at_qwen3_30b_a3b_tp4():
    T, K, E, inter = 131, 8, 128, 192
    costs = {b: moe.expected_blocks(T, K, E, b) * (inter + b) for b in range(moe.PREFILL_BLOCK_STEP, mp.PMAX + 1, 8)}
    assert moe.bucket_block_size(T, K, E, inter) == min(costs, key=costs.get)


def test_bucket_block_size_grows_with_tokens_per_expert():
    sizes = [moe.bucket_block_size(T, 8, 128, 192) for T in (1, 131, 512, 4096)]
    assert sizes == sorted(sizes) and sizes[0] == moe.PREFILL_BLOCK_STEP and sizes[-1] == mp.PMAX


@pytest.mark.parametrize("T", [1, 131, 512])
def test_bucket_block_size_is_a_step_multiple_the_kernel_accepts(T):
    b = moe.bucket_block_size(T, 8, 128, 192)
    assert b % moe.PREFILL_BLOCK_STEP == 0 and moe.PREFILL_BLOCK_STEP <= b <= mp.PMAX


def test_prefill_block_metadata_traces_without_host_syncs():
    """The table is built inside a compiled graph: fullgraph tracing fails on .item(), int(tensor) or a
    data-dependent shape."""
    g = torch.Generator().manual_seed(3)
    T, K, E, B = 9, 2, 6, 4
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    wts = torch.rand(T, K, generator=g)
    compiled = torch.compile(mp.prefill_block_metadata, fullgraph=True, backend="eager")
    for got, want in zip(compiled(ids, wts, E, B), mp.prefill_block_metadata(ids, wts, E, B)):
        assert torch.equal(got, want)
