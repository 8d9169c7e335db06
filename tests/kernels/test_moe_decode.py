"""kernels/moe_decode.py: selective-expert decode and the fused MoE block vs their references, limits, roofline."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nki_emulator as emulator

emulator.install()

from vllm_nki_moe.kernels import moe_decode as md  # noqa: E402

from vllm_nki_moe.ops import moe, norms  # noqa: E402
from vllm_nki_moe.ops import router as router_ops  # noqa: E402
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close  # noqa: E402

SEED = 0
EPS = 1e-6  # Qwen3-30B-A3B rms_norm_eps

# Qwen3-30B-A3B per tensor-parallel rank (config.json: hidden_size 2048, moe_intermediate_size 768, num_experts 128,
# num_experts_per_tok 8; TP shards the expert intermediate): name, H, I, E, K.
QWEN3_30B_A3B_TP1 = ("qwen3-30b-a3b-tp1", 2048, 768, 128, 8)
QWEN3_30B_A3B_TP4 = ("qwen3-30b-a3b-tp4", 2048, 192, 128, 8)
QWEN3_30B_A3B_TP8 = ("qwen3-30b-a3b-tp8", 2048, 96, 128, 8)
# TP=1 with all 128 experts is 1.2 GB of bf16 weights: the fast suite runs its per-expert shapes with 16 experts.
QWEN3_30B_A3B_TP1_E16 = ("qwen3-30b-a3b-tp1-e16", 2048, 768, 16, 8)

# Edge sizes: 1 token, a ragged count, the 128-token maximum minus one and at it; H and I that are not multiples of
# 128 but split evenly (200 = 2 x 100, 96 on 96 partitions); the tiny test model (H 128, I 64, E 8, K 2).
TOKEN_COUNTS = (1, 5, 127, 128)
SMALL_SHAPES = [  # name, H, I, E, K
    ("tiny-model", 128, 64, 8, 2),
    ("h200-i96", 200, 96, 16, 4),
    ("h384-i330", 384, 330, 12, 3),
]
DTYPES = {torch.float32: "float32_matmul", torch.bfloat16: "bfloat16_matmul"}

# Qwen3-30B-A3B TP=4, batch 1: the cost model must put both kernels at >= 70% of their HBM roofline (issue 4).
ROOFLINE_TARGET = 0.70


def _experts(H: int, I: int, E: int, dtype, seed: int = SEED):  # noqa: E741 - I is the paper's name
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I**-0.5).to(dtype)
    return w13, w2


def _routing(T: int, E: int, K: int, seed: int = SEED, same_expert: int | None = None):
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    if same_expert is not None:  # every token routes its first slot to `same_expert`
        for t in range(T):
            row = [same_expert] + [e for e in ids[t].tolist() if e != same_expert]
            ids[t] = torch.tensor(row[:K])
    w = torch.rand(T, K, generator=g) + 0.1
    return (w / w.sum(-1, keepdim=True)).float(), ids.to(torch.int32)


def _decode_inputs(T, H, I, E, K, dtype, same_expert=None):  # noqa: E741
    g = torch.Generator().manual_seed(SEED + 2)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13, w2 = _experts(H, I, E, dtype)
    w13k, w2k = md.experts_kernel_layout(w13, w2)
    wts, ids = _routing(T, E, K, same_expert=same_expert)
    return (x, w13k, w2k, wts, ids), (w13, w2)


def _block_inputs(T, H, I, E, dtype):  # noqa: E741
    g = torch.Generator().manual_seed(SEED + 3)
    x = torch.randn(T, H, generator=g).to(dtype)
    res = torch.randn(T, H, generator=g).to(dtype)
    gamma = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    router = (torch.randn(E, H, generator=g) * H**-0.5 * 4).to(dtype)
    w13, w2 = _experts(H, I, E, dtype)
    w13k, w2k = md.experts_kernel_layout(w13, w2)
    return (x, res, gamma, md.router_kernel_layout(router), w13k, w2k), (router, w13, w2)


def _min_decode_bytes(T, H, I, K, dtype, experts_read):  # noqa: E741
    item = torch.tensor([], dtype=dtype).element_size()
    return experts_read * 3 * H * I * item + 2 * T * H * item + T * K * 8


# ----- layout ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,H,I,E,K", SMALL_SHAPES + [QWEN3_30B_A3B_TP8[:1] + (2048, 96, 2, 8)])
def test_experts_kernel_layout_round_trips(name, H, I, E, K):  # noqa: E741
    w13, w2 = _experts(H, I, E, torch.float32)
    w13k, w2k = md.experts_kernel_layout(w13, w2)
    back13, back2 = md.experts_model_layout(w13k, w2k)
    assert torch.equal(back13, w13) and torch.equal(back2, w2)


def test_experts_kernel_layout_puts_h_partition_major():
    w13, w2 = _experts(256, 64, 2, torch.float32)
    w13k, w2k = md.experts_kernel_layout(w13, w2)  # HP=128, KT=2, IP=64, IT=1
    e, p, kt, q = 1, 5, 1, 7
    assert w13k[e, 0, p, kt, q] == w13[e, q, p * 2 + kt]  # gate row q
    assert w13k[e, 0, p, kt, 64 + q] == w13[e, 64 + q, p * 2 + kt]  # up row q
    assert w2k[e, 0, q, kt * 128 + p] == w2[e, p * 2 + kt, q]


@pytest.mark.parametrize("n", [257, 131])
def test_split_tiles_rejects_sizes_without_equal_partition_tiles(n):
    with pytest.raises(ValueError, match=f"H={n}; must split into"):
        md.split_tiles(n, "test", "H")


# ----- moe_decode --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", TOKEN_COUNTS)
@pytest.mark.parametrize("name,H,I,E,K", SMALL_SHAPES[:2])
def test_moe_decode_matches_ref(name, H, I, E, K, T, dtype):  # noqa: E741
    args, _ = _decode_inputs(T, H, I, E, K, dtype)
    assert_close(md.moe_decode(*args), md.moe_decode_ref(*args), DTYPES[dtype])


@pytest.mark.parametrize(
    "name,H,I,E,K",
    [
        QWEN3_30B_A3B_TP4,
        QWEN3_30B_A3B_TP8,
        QWEN3_30B_A3B_TP1_E16,
        pytest.param(*QWEN3_30B_A3B_TP1, marks=pytest.mark.slow),
    ],
)
def test_moe_decode_matches_ref_at_qwen3_30b_a3b_rank_shapes(name, H, I, E, K):  # noqa: E741
    args, _ = _decode_inputs(1, H, I, E, K, torch.bfloat16)
    assert_close(md.moe_decode(*args), md.moe_decode_ref(*args), "bfloat16_matmul")


def test_moe_decode_matches_the_models_torch_experts_in_float32():
    args, (w13, w2) = _decode_inputs(5, 200, 96, 16, 4, torch.float32)
    x, _, _, wts, ids = args
    assert_close(md.moe_decode(*args), moe.moe_experts(x, w13, w2, wts, ids.long()), "float32_matmul")


def test_moe_decode_handles_every_token_routed_to_the_same_expert():
    args, _ = _decode_inputs(9, 128, 64, 8, 2, torch.float32, same_expert=3)
    assert (args[4] == 3).any(dim=1).all()
    assert_close(md.moe_decode(*args), md.moe_decode_ref(*args), "float32_matmul")


def test_moe_decode_reads_only_the_selected_experts_and_meets_the_roofline_target():
    name, H, I, E, K = QWEN3_30B_A3B_TP4  # noqa: E741
    args, _ = _decode_inputs(1, H, I, E, K, torch.bfloat16)
    out, rep = emulator.run(md.moe_decode, *args)
    expert_bytes = 3 * H * I * 2
    assert rep.hbm_read_bytes < (K + 0.01) * expert_bytes  # K experts of 128, plus activations
    roofline = _min_decode_bytes(1, H, I, K, torch.bfloat16, K) / (rep.hbm_bytes / rep.hbm_roofline_seconds)
    assert roofline / rep.estimated_seconds >= ROOFLINE_TARGET, rep.format()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 6),
    KT=st.integers(1, 3),
    HP=st.sampled_from([8, 64, 100, 128]),
    IT=st.integers(1, 2),
    IP=st.sampled_from([16, 96, 128]),
    E=st.integers(8, 20),
    K=st.integers(1, 8),
)
def test_moe_decode_matches_ref_for_any_tiled_shape(T, KT, HP, IT, IP, E, K):
    args, _ = _decode_inputs(T, HP * KT, IP * IT, E, K, torch.float32)
    assert_close(md.moe_decode(*args), md.moe_decode_ref(*args), "float32_matmul")


def _decode_args(**over):
    args, _ = _decode_inputs(2, 128, 64, 8, 2, torch.float32)
    names = ("hidden", "w13", "w2", "topk_weights", "topk_ids")
    d = dict(zip(names, args))
    d.update(over)
    return [d[n] for n in names]


# Invalid cases, one per documented limit of moe_decode: (id, overrides, message fragment).
DECODE_INVALID = [
    ("too-many-tokens", {"hidden": torch.zeros(129, 128)}, "T=129; must be 1..128"),
    ("hidden-int", {"hidden": torch.zeros(2, 128, dtype=torch.int32)}, "hidden.dtype"),
    ("weights-dtype-differs", {"w13": torch.zeros(8, 1, 128, 1, 128, dtype=torch.bfloat16)}, "must equal hidden"),
    ("w13-not-kernel-layout", {"w13": torch.zeros(8, 128, 128)}, "kernel layout"),
    ("w13-wrong-hidden", {"w13": torch.zeros(8, 1, 64, 1, 128)}, "HP\\*KT must equal H=128"),
    ("w2-wrong-shape", {"w2": torch.zeros(8, 1, 64, 64)}, "w2.shape"),
    ("ids-int16", {"topk_ids": torch.zeros(2, 2, dtype=torch.int16)}, "topk_ids.dtype"),
    ("ids-wrong-tokens", {"topk_ids": torch.zeros(3, 2, dtype=torch.int32)}, "must be \\[T=2, K\\]"),
    ("weights-bf16", {"topk_weights": torch.zeros(2, 2, dtype=torch.bfloat16)}, "topk_weights"),
    ("expert-id-out-of-range", {"topk_ids": torch.tensor([[0, 8], [1, 2]], dtype=torch.int32)}, "out of bounds"),
]


@pytest.mark.parametrize("case,over,match", DECODE_INVALID, ids=[c[0] for c in DECODE_INVALID])
def test_moe_decode_rejects_invalid_arguments(case, over, match):
    with pytest.raises(ValueError, match=match):
        md.moe_decode(*_decode_args(**over))


# ----- moe_block_decode -------------------------------------------------------------------------------------------
def _model_block(x, res, gamma, router, w13, w2, top_k, norm):
    """The model's decode MoE path through the reference ops: fused add + RMSNorm, gate, router_topk, experts."""
    h, r = norms.fused_add_rms_norm(x, res, gamma, EPS)
    weights, ids = router_ops.router_topk(h @ router.T, top_k, norm)
    return moe.moe_experts(h, w13, w2, weights, ids), r


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", (1, 5, 128))
def test_moe_block_decode_matches_ref(T, dtype, norm):
    args, _ = _block_inputs(T, 200, 96, 16, dtype)
    out = md.moe_block_decode(*args, EPS, 4, norm)
    ref = md.moe_block_decode_ref(*args, EPS, 4, norm)
    assert_close(out[1], ref[1], "exact")  # r = hidden + residual, rounded alike
    assert_close(out[0], ref[0], DTYPES[dtype])


def test_moe_block_decode_matches_the_models_torch_path_in_float32():
    args, (router, w13, w2) = _block_inputs(3, 128, 64, 8, torch.float32)
    out, r = md.moe_block_decode(*args, EPS, 2, True)
    ref, ref_r = _model_block(args[0], args[1], args[2], router, w13, w2, 2, True)
    assert_close(r, ref_r, "exact")
    assert_close(out, ref, "float32_matmul")


@pytest.mark.parametrize(
    "name,H,I,E,K", [QWEN3_30B_A3B_TP4, QWEN3_30B_A3B_TP8, pytest.param(*QWEN3_30B_A3B_TP1, marks=pytest.mark.slow)]
)
def test_moe_block_decode_matches_ref_at_qwen3_30b_a3b_rank_shapes(name, H, I, E, K):  # noqa: E741
    args, _ = _block_inputs(1, H, I, E, torch.bfloat16)
    out = md.moe_block_decode(*args, EPS, K, True)
    ref = md.moe_block_decode_ref(*args, EPS, K, True)
    assert_close(out[0], ref[0], "bfloat16_matmul")
    assert_close(out[1], ref[1], "exact")


def test_moe_block_decode_meets_the_roofline_target_at_qwen3_30b_a3b_tp4_batch_1():
    name, H, I, E, K = QWEN3_30B_A3B_TP4  # noqa: E741
    args, _ = _block_inputs(1, H, I, E, torch.bfloat16)
    _, rep = emulator.run(md.moe_block_decode, *args, EPS, K, True)
    # minimum: K experts, the router weights, gamma, and hidden + residual in, out + residual out
    min_bytes = _min_decode_bytes(1, H, I, K, torch.bfloat16, K) - K * 8 + E * H * 2 + H * 2 + 2 * H * 2
    roofline = min_bytes / (rep.hbm_bytes / rep.hbm_roofline_seconds)
    assert roofline / rep.estimated_seconds >= ROOFLINE_TARGET, rep.format()


def _block_args(**over):
    args, _ = _block_inputs(2, 128, 64, 8, torch.float32)
    names = ("hidden", "residual", "gamma", "router_w", "w13", "w2", "eps", "top_k", "norm_topk_prob")
    d = dict(zip(names, list(args) + [EPS, 2, True]))
    d.update(over)
    return [d[n] for n in names]


BLOCK_INVALID = [
    ("too-many-tokens", {"hidden": torch.zeros(129, 128), "residual": torch.zeros(129, 128)}, "T=129"),
    ("residual-shape", {"residual": torch.zeros(3, 128)}, "residual="),
    ("gamma-shape", {"gamma": torch.zeros(64)}, "gamma="),
    ("router-not-kernel-layout", {"router_w": torch.zeros(8, 128)}, "router_kernel_layout"),
    ("top-k-9", {"top_k": 9}, "top_k=9; must be 1..8"),
    ("top-k-0", {"top_k": 0}, "top_k=0"),
]


@pytest.mark.parametrize("case,over,match", BLOCK_INVALID, ids=[c[0] for c in BLOCK_INVALID])
def test_moe_block_decode_rejects_invalid_arguments(case, over, match):
    with pytest.raises(ValueError, match=match):
        md.moe_block_decode(*_block_args(**over))


def test_moe_block_decode_rejects_fewer_than_8_experts():
    args, _ = _block_inputs(2, 128, 64, 4, torch.float32)
    with pytest.raises(ValueError, match="E=4; must be 8..512"):
        md.moe_block_decode(*args, EPS, 2, True)
