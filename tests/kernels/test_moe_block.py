"""kernels/moe_block.py: the fused decode MoE block vs its reference and the model's torch path, limits, roofline."""

from __future__ import annotations

import pytest
import torch

import nki_emulator as emulator

emulator.install()

from vllm_nki_moe.kernels import moe_block as mb  # noqa: E402

from tests.kernels.moe_cases import (  # noqa: E402
    DTYPES,
    EPS,
    QWEN3_30B_A3B_TP1,
    QWEN3_30B_A3B_TP4,
    QWEN3_30B_A3B_TP8,
    ROOFLINE_TARGET,
    _block_inputs,
    _min_decode_bytes,
)
from vllm_nki_moe.ops import moe, norms  # noqa: E402
from vllm_nki_moe.ops import router as router_ops  # noqa: E402
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close  # noqa: E402


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
    out = mb.moe_block_decode(*args, EPS, 4, norm)
    ref = mb.moe_block_decode_ref(*args, EPS, 4, norm)
    assert_close(out[1], ref[1], "exact")  # r = hidden + residual, rounded alike
    assert_close(out[0], ref[0], DTYPES[dtype])


def test_moe_block_decode_matches_the_models_torch_path_in_float32():
    args, (router, w13, w2) = _block_inputs(3, 128, 64, 8, torch.float32)
    out, r = mb.moe_block_decode(*args, EPS, 2, True)
    ref, ref_r = _model_block(args[0], args[1], args[2], router, w13, w2, 2, True)
    assert_close(r, ref_r, "exact")
    assert_close(out, ref, "float32_matmul")


@pytest.mark.parametrize(
    "name,H,I,E,K", [QWEN3_30B_A3B_TP4, QWEN3_30B_A3B_TP8, pytest.param(*QWEN3_30B_A3B_TP1, marks=pytest.mark.slow)]
)
def test_moe_block_decode_matches_ref_at_qwen3_30b_a3b_rank_shapes(name, H, I, E, K):  # noqa: E741
    args, _ = _block_inputs(1, H, I, E, torch.bfloat16)
    out = mb.moe_block_decode(*args, EPS, K, True)
    ref = mb.moe_block_decode_ref(*args, EPS, K, True)
    assert_close(out[0], ref[0], "bfloat16_matmul")
    assert_close(out[1], ref[1], "exact")


def test_moe_block_decode_meets_the_roofline_target_at_qwen3_30b_a3b_tp4_batch_1():
    name, H, I, E, K = QWEN3_30B_A3B_TP4  # noqa: E741
    args, _ = _block_inputs(1, H, I, E, torch.bfloat16)
    _, rep = emulator.run(mb.moe_block_decode, *args, EPS, K, True)
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
        mb.moe_block_decode(*_block_args(**over))


def test_moe_block_decode_rejects_fewer_than_8_experts():
    args, _ = _block_inputs(2, 128, 64, 4, torch.float32)
    with pytest.raises(ValueError, match="E=4; must be 8..512"):
        mb.moe_block_decode(*args, EPS, 2, True)


@pytest.mark.parametrize("T,K", [(1, 8), (3, 3), (2, 1)])
def test_moe_block_decode_on_two_programs_matches_ref(T, K):
    args, _ = _block_inputs(T, 256, 128, 16, torch.bfloat16)
    (out, r), rep = emulator.run(mb.moe_block_decode[2], *args, EPS, K, True)
    ref, ref_r = mb.moe_block_decode_ref(*args, EPS, K, True)
    assert rep.num_programs == 2
    assert_close(r, ref_r, "exact")  # stored by partition shares: every row written once
    assert_close(out, ref, "bfloat16_matmul")


def test_moe_block_decode_on_two_programs_meets_the_roofline_target_at_qwen3_30b_a3b_tp4_batch_1():
    name, H, I, E, K = QWEN3_30B_A3B_TP4  # noqa: E741
    args, _ = _block_inputs(1, H, I, E, torch.bfloat16)
    (out, _), rep = emulator.run(mb.moe_block_decode[2], *args, EPS, K, True)
    assert_close(out, mb.moe_block_decode_ref(*args, EPS, K, True)[0], "bfloat16_matmul")
    # the K experts once, plus what both cores read (router weights, gamma, hidden and residual), at the logical
    # core's bandwidth (both physical cores')
    both = E * H * 2 + H * 2 + 2 * H * 2
    min_bytes = _min_decode_bytes(1, H, I, K, torch.bfloat16, K) - K * 8 + 2 * both
    roofline = min_bytes / (rep.hbm_bytes / rep.hbm_roofline_seconds)
    assert roofline / rep.estimated_seconds >= ROOFLINE_TARGET, rep.format()
