"""kernels/router.py: softmax -> top-k -> renormalisation matches its reference and torch's routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm_nki_moe.kernels import router
from vllm_nki_moe.kernels.limits import PMAX

from nki_emulator import run
from vllm_nki_moe import ops
from vllm_nki_moe.ops import router as router_ops
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close

from .conftest import SEED, randn

# Qwen3-30B-A3B (config.json): 128 experts, top-8, norm_topk_prob true; the router is replicated on every TP rank,
# so its shapes are the same at TP 1, 4 and 8.
QWEN3_30B_A3B = (128, 8, True)
TOKENS = [1, PMAX - 1, PMAX + 1]
DTYPES = [torch.bfloat16, torch.float32]


def _check(logits, k, renorm):
    (w, ids), _ = run(router.router_topk, logits, k, renorm)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32 and w.shape == ids.shape == (logits.shape[0], k)
    ref_w, ref_ids = router.router_topk_ref(logits, k, renorm)
    assert torch.equal(ids, ref_ids)
    assert_close(w, ref_w, "float32")
    return w, ids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tp", [1, 4, 8])
@pytest.mark.parametrize("T", TOKENS)
def test_router_topk_matches_ref_qwen3_30b_a3b(T, tp, dtype, rng):
    E, K, renorm = QWEN3_30B_A3B
    _check(randn(rng, (T, E), dtype, 2.0), K, renorm)


@pytest.mark.parametrize("T", TOKENS)
def test_router_topk_fp32_matches_torch_topk_without_ties(T, rng):
    """Distinct fp32 probabilities: the same experts as ops.router.router_topk (torch.topk) and the same weights."""
    E, K, renorm = QWEN3_30B_A3B
    logits = randn(rng, (T, E), torch.float32, 2.0)
    w, ids = _check(logits, K, renorm)
    tw, tids = router_ops.router_topk(logits, K, renorm)
    assert torch.equal(ids.long(), tids)
    assert_close(w, tw, "float32")


@pytest.mark.parametrize(
    "E,K,renorm",
    [(60, 4, False), (8, 2, True), (4, 2, True), (1, 1, False), (512, 8, True), (129, 1, True), (16384, 8, False)],
)
def test_router_topk_matches_ref_other_expert_counts(E, K, renorm, rng):
    """Fewer than 8 experts (padded with -inf), E at the nki-library size limit 512, and max8's 16,384."""
    _check(randn(rng, (5, E), torch.float32, 2.0), K, renorm)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 260), E=st.integers(1, 300), k=st.integers(1, 8), renorm=st.booleans(), bf16=st.booleans())
def test_router_topk_matches_ref_any_shape(T, E, k, renorm, bf16):
    k = min(k, E)
    rng = np.random.default_rng(SEED)
    _check(randn(rng, (T, E), torch.bfloat16 if bf16 else torch.float32, 3.0), k, renorm)


def test_router_topk_breaks_ties_lowest_index_first():
    """Equal probabilities rank lowest expert first; torch.topk gives the same values but its own (unspecified)
    order among the tied indices, which is why the reference uses a stable descending sort."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 3.0, 1.0, 5.0, 3.0]] * 3)
    w, ids = _check(logits, 5, False)
    assert ids.tolist() == [[8, 1, 2, 4, 6]] * 3
    tw, tids = torch.topk(torch.softmax(logits, -1), 5)
    assert torch.equal(w, tw)
    assert set(tids[0, 1:].tolist()) <= {1, 2, 4, 6, 9}  # torch picks 4 of the 5 tied experts, in its own order


def test_router_topk_all_equal_logits_select_the_first_k_experts():
    w, ids = _check(torch.zeros(2, 128), 8, True)
    assert ids.tolist() == [list(range(8))] * 2
    assert torch.allclose(w, torch.full((2, 8), 1 / 8))


def test_ops_router_topk_runs_the_kernel_and_returns_int64_ids(rng):
    opset = ops.bind("emulator")
    assert "router_topk" in opset.kernel_ops
    logits = randn(rng, (9, 16), torch.float32, 2.0)
    w, ids = opset.router_topk(logits, 4, True)
    tw, tids = router_ops.router_topk(logits, 4, True)
    assert ids.dtype == torch.int64 and torch.equal(ids, tids)
    assert_close(w, tw, "float32")


# --- limits ---------------------------------------------------------------------------------------------------------
def test_router_topk_rejects_top_k_above_8(rng):
    with pytest.raises(ValueError, match=r"router_topk: top_k=9; must be 1..8"):
        run(router.router_topk, randn(rng, (2, 128), torch.float32), 9, True)


def test_router_topk_rejects_top_k_zero(rng):
    with pytest.raises(ValueError, match=r"router_topk: top_k=0; must be 1..8"):
        run(router.router_topk, randn(rng, (2, 128), torch.float32), 0, True)


def test_router_topk_rejects_top_k_above_expert_count(rng):
    with pytest.raises(ValueError, match=r"router_topk: top_k=4; must not exceed E=3"):
        run(router.router_topk, randn(rng, (2, 3), torch.float32), 4, True)


def test_router_topk_rejects_more_experts_than_max8_reads(rng):
    with pytest.raises(ValueError, match=r"router_topk: E=16385; must be 1..16384"):
        run(router.router_topk, randn(rng, (1, 16385), torch.float32), 8, True)


def test_router_topk_rejects_1d_logits(rng):
    with pytest.raises(ValueError, match=r"router_topk: logits.shape=\(128,\); must be 2-D"):
        run(router.router_topk, randn(rng, (128,), torch.float32), 8, True)


# --- router_topk_matmul: the gate matmul fused in ------------------------------------------------------------------
HIDDEN = 2048  # Qwen3-30B-A3B hidden_size (config.json); the gate [E, H] is replicated on every TP rank


def _gate(rng, H, E, dtype):
    """Gate weight in the kernel layout [H, E]; std 2/sqrt(H) gives N(0, 4) logits for unit-variance x."""
    return torch.from_numpy(rng.standard_normal((H, E), dtype=np.float32) * (2.0 / H**0.5)).to(dtype)


def _check_matmul(x, w, k, renorm):
    (wts, ids), report = run(router.router_topk_matmul, x, w, k, renorm)
    assert wts.dtype == torch.float32 and ids.dtype == torch.int32 and wts.shape == ids.shape == (x.shape[0], k)
    ref_w, ref_ids = router.router_topk_matmul_ref(x, w, k, renorm)
    # The logits are fp32 sums in another order than the reference's, so two experts whose reference probabilities
    # tie exactly may come out a few ulps apart in the kernel and rank the other way: only such a pair may differ.
    probs = torch.softmax(x.float() @ w.float(), dim=-1)
    for row in (ids != ref_ids).any(dim=1).nonzero().flatten().tolist():
        ours, theirs = probs[row, ids[row].long()], probs[row, ref_ids[row].long()]
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0, msg=f"token {row}: experts differ beyond a tie")
    assert_close(wts, ref_w, "float32_matmul")
    return (wts, ids), report


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", TOKENS)
def test_router_topk_matmul_matches_ref_qwen3_30b_a3b(T, dtype, rng):
    """Same shapes at TP 1, 4 and 8: the router is replicated."""
    E, K, renorm = QWEN3_30B_A3B
    _check_matmul(randn(rng, (T, HIDDEN), dtype), _gate(rng, HIDDEN, E, dtype), K, renorm)


@pytest.mark.parametrize(
    "E,K,renorm,H", [(4, 2, True, 256), (60, 4, False, 384), (512, 8, True, 128), (1, 1, True, 128)]
)
def test_router_topk_matmul_matches_ref_other_sizes(E, K, renorm, H, rng):
    """Fewer than 8 experts (logits copied out of PSUM into a -inf padded tile), E at the one-bank limit 512."""
    _check_matmul(randn(rng, (5, H), torch.float32), _gate(rng, H, E, torch.float32), K, renorm)


def test_router_topk_matmul_equals_gate_then_router_topk_in_fp32(rng):
    """fp32: the fused kernel routes as F.linear followed by the unfused router_topk kernel."""
    x, w = randn(rng, (9, HIDDEN), torch.float32), _gate(rng, HIDDEN, 128, torch.float32)
    (wts, ids), _ = _check_matmul(x, w, 8, True)
    (uw, uids), _ = run(router.router_topk, torch.nn.functional.linear(x, w.t()), 8, True)
    assert torch.equal(ids, uids)
    assert_close(wts, uw, "float32_matmul")


def test_router_topk_matmul_decode_is_within_80_percent_of_hbm_roofline(rng):
    """T=1 bf16: the 512 KiB gate weight dominates the engines' work; the matmuls hide under its DMA (cost model,
    busiest engine). The dependency chain (weight load, matmuls, softmax, top-k, store) adds its latency: decode
    runs this router inside moe_block_decode instead, one chain for the whole MoE block."""
    _, report = _check_matmul(randn(rng, (1, HIDDEN), torch.bfloat16), _gate(rng, HIDDEN, 128, torch.bfloat16), 8, True)
    assert report.hbm_read_bytes == HIDDEN * 2 + HIDDEN * 128 * 2
    assert report.hbm_roofline_seconds >= 0.8 * report.engine_bound_seconds


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 200), tiles=st.integers(1, 4), E=st.integers(1, 200), k=st.integers(1, 8), bf16=st.booleans())
def test_router_topk_matmul_matches_ref_any_shape(T, tiles, E, k, bf16):
    rng = np.random.default_rng(SEED)
    dtype = torch.bfloat16 if bf16 else torch.float32
    H = tiles * PMAX
    _check_matmul(randn(rng, (T, H), dtype), _gate(rng, H, E, dtype), min(k, E), True)


def test_router_topk_matmul_rejects_hidden_not_a_multiple_of_128(rng):
    with pytest.raises(ValueError, match=r"router_topk_matmul: H=200; must be a multiple of 128"):
        run(router.router_topk_matmul, randn(rng, (2, 200), torch.float32), _gate(rng, 200, 16, torch.float32), 8, 1)


def test_router_topk_matmul_rejects_more_experts_than_one_psum_bank(rng):
    with pytest.raises(ValueError, match=r"router_topk_matmul: E=513; must be 1..512"):
        run(router.router_topk_matmul, randn(rng, (2, 128), torch.float32), _gate(rng, 128, 513, torch.float32), 8, 1)


def test_router_topk_matmul_rejects_top_k_above_8(rng):
    with pytest.raises(ValueError, match=r"router_topk_matmul: top_k=9; must be 1..min\(8, E=16\)"):
        run(router.router_topk_matmul, randn(rng, (2, 128), torch.float32), _gate(rng, 128, 16, torch.float32), 9, 1)


def test_router_topk_matmul_rejects_top_k_above_expert_count(rng):
    with pytest.raises(ValueError, match=r"router_topk_matmul: top_k=4; must be 1..min\(8, E=3\)"):
        run(router.router_topk_matmul, randn(rng, (2, 128), torch.float32), _gate(rng, 128, 3, torch.float32), 4, 1)


def test_router_topk_matmul_rejects_gate_dtype_mismatch(rng):
    with pytest.raises(ValueError, match=r"router_topk_matmul: gate_weight_t.dtype=.*must equal x.dtype"):
        run(router.router_topk_matmul, randn(rng, (2, 128), torch.float32), _gate(rng, 128, 8, torch.bfloat16), 8, 1)


def test_router_topk_matmul_rejects_gate_of_wrong_hidden_size(rng):
    with pytest.raises(ValueError, match=r"router_topk_matmul: gate_weight_t.shape=\(256, 8\); must be \[H=128, E\]"):
        run(router.router_topk_matmul, randn(rng, (2, 128), torch.float32), _gate(rng, 256, 8, torch.float32), 8, 1)


def test_router_topk_matmul_rejects_3d_x(rng):
    with pytest.raises(ValueError, match=r"router_topk_matmul: x.shape=\(1, 2, 128\); must be 2-D"):
        run(router.router_topk_matmul, randn(rng, (1, 2, 128), torch.float32), _gate(rng, 128, 8, torch.float32), 8, 1)


def test_router_topk_matmul_rejects_gate_too_large_for_sbuf(rng):
    H = 128 * 200  # bf16 [128, 200 x 512] weight = 200 KiB per partition, plus an x tile: over 212,728 B
    x, w = torch.zeros(1, H, dtype=torch.bfloat16), torch.zeros(H, 512, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"router_topk_matmul: H=25600, E=512 need .* must fit 212728 B"):
        run(router.router_topk_matmul, x, w, 8, True)
