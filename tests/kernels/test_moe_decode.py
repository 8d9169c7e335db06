"""kernels/moe_decode.py: selective-expert decode vs its reference and the model's torch experts, limits, roofline."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nki_emulator as emulator

emulator.install()

from vllm_nki_moe.kernels import moe_decode as md  # noqa: E402

from tests.kernels.moe_cases import (  # noqa: E402
    DTYPES,
    QWEN3_30B_A3B_TP1,
    QWEN3_30B_A3B_TP1_E16,
    QWEN3_30B_A3B_TP4,
    QWEN3_30B_A3B_TP8,
    ROOFLINE_TARGET,
    SMALL_SHAPES,
    TOKEN_COUNTS,
    _decode_inputs,
    _min_decode_bytes,
)
from vllm_nki_moe.ops import moe  # noqa: E402
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close  # noqa: E402


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


@pytest.mark.parametrize("T,K", [(1, 8), (3, 3), (1, 1), (5, 2)])  # even split, uneven split, one slot (core 1 idle)
def test_moe_decode_on_two_programs_matches_ref_each_core_reading_its_share_of_the_experts(T, K):
    args, _ = _decode_inputs(T, 256, 128, 16, K, torch.bfloat16)
    one, one_rep = emulator.run(md.moe_decode, *args)
    two, two_rep = emulator.run(md.moe_decode[2], *args)
    assert_close(two, md.moe_decode_ref(*args), "bfloat16_matmul")
    assert_close(two, one, "bfloat16_matmul")  # the partial sums add in another order, then round once
    assert two_rep.num_programs == 2
    expert_bytes = 3 * 256 * 128 * 2
    slots = T * K
    # both programs read the tokens, ids and weights; the experts' weights are read once, split between them
    assert abs(two_rep.hbm_read_bytes - one_rep.hbm_read_bytes - (one_rep.hbm_read_bytes - slots * expert_bytes)) < 1
    if slots >= 2:  # the busier core streams its share of the experts; at these tiny sizes latency dominates the rest
        busiest = -(-slots // 2) / slots
        assert two_rep.engine_bound_seconds < (busiest + 0.15) * one_rep.engine_bound_seconds, two_rep.format()
        assert two_rep.estimated_seconds < one_rep.estimated_seconds, two_rep.format()


def test_moe_decode_on_two_programs_halves_the_time_at_qwen3_30b_a3b_tp4_batch_1():
    name, H, I, E, K = QWEN3_30B_A3B_TP4  # noqa: E741
    args, _ = _decode_inputs(1, H, I, E, K, torch.bfloat16)
    out, rep = emulator.run(md.moe_decode[2], *args)
    assert_close(out, md.moe_decode_ref(*args), "bfloat16_matmul")
    # the launch's roofline is the logical core's: both physical cores' HBM bandwidth
    roofline = _min_decode_bytes(1, H, I, K, torch.bfloat16, K) / (rep.hbm_bytes / rep.hbm_roofline_seconds)
    assert roofline / rep.estimated_seconds >= ROOFLINE_TARGET, rep.format()
    one_core = emulator.run(md.moe_decode, *args)[1]
    assert rep.estimated_seconds < 0.55 * one_core.estimated_seconds


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
