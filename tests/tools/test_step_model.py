"""The rest of a step around the kernels (``kernel_check.step_model``) and its limit, against hand-worked figures."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest

from nki_emulator.cost import HBM_BYTES_PER_S_PER_CORE
from vllm_nki_moe.tools.kernel_check import bench, step_model
from vllm_nki_moe.tools.kernel_check.shapes import kernel_shapes

CORE_BW = HBM_BYTES_PER_S_PER_CORE  # 2.9 TB/s / 8 physical cores (trainium2.rst)


def test_small_all_reduce_is_two_mesh_hops_plus_its_traffic():
    # 4 KiB over 4 ranks: Mesh (< 1 MB): ReduceScatter + AllGather = 2 hops of 2 us; each rank moves
    # 2 * 3/4 * 4096 = 6144 bytes, read and written (x2), at one logical core's 2 x 362.5 GB/s.
    assert step_model.all_reduce_seconds(4096, 4) == pytest.approx(2 * 2e-6 + 2 * 6144 / (2 * CORE_BW))


def test_large_all_reduce_takes_log2_hops_per_phase():
    nbytes = 2 << 20  # 2 MiB (a 512-token prefill's activations): RDH, log2(8) = 3 hops per phase
    expected = 2 * 3 * 2e-6 + 2 * (2 * 7 / 8 * nbytes) / (2 * CORE_BW)
    assert step_model.all_reduce_seconds(nbytes, 8) == pytest.approx(expected)


def test_one_rank_needs_no_collective():
    assert step_model.all_reduce_seconds(1 << 20, 1) == 0.0
    assert step_model.all_gather_seconds(64, 1) == 0.0


@pytest.mark.parametrize("experts, top_k, tokens", [(4, 2, 2), (5, 1, 3), (6, 3, 2)])
def test_expected_distinct_experts_matches_enumeration(experts, top_k, tokens):
    choices = list(itertools.combinations(range(experts), top_k))
    outcomes = list(itertools.product(choices, repeat=tokens))
    mean = sum(len(set().union(*o)) for o in outcomes) / len(outcomes)
    assert step_model.expected_distinct_experts(experts, top_k, tokens) == pytest.approx(mean)


def test_qwen3_30b_a3b_batch_1_limit_at_tp4_by_hand():
    # Per rank at TP 4 (elements): attention 2048 x (8 + 2) x 128 + 8 x 128 x 2048 = 4,718,592; KV cache of 640
    # tokens 640 x 2 x 1 x 128 = 163,840; 8 experts x 3 x 2048 x 192 + router 2048 x 128 = 9,699,328; x 48 layers
    # = 699,924,480; LM head shard 37,984 x 2048 = 77,791,232. Total 777,715,712 bf16 = 1,555,431,424 bytes at
    # 2 x 362.5 GB/s = 2.1454 ms (the issue's 6.1 GB at 2.9 TB/s = 2.1 ms for the whole chip).
    shapes = kernel_shapes(None, 4)
    assert step_model.limit_seconds(shapes, 1) == pytest.approx(1_555_431_424 / (2 * CORE_BW))


def test_parts_a_kernel_covers_leave_the_rest():
    shapes = kernel_shapes(None, 4)
    names = [p.name for p in step_model.rest_of_step(shapes, 1, set(), kernel_calls=10)]
    assert {"qkv_proj", "o_proj", "lm_head", "final norm"} <= set(names)
    covered = [p.name for p in step_model.rest_of_step(shapes, 1, {"qkv_proj", "lm_head"}, kernel_calls=10)]
    assert "qkv_proj" not in covered and "lm_head" not in covered and "o_proj" in covered


def test_rest_of_step_counts_two_all_reduces_per_layer_and_every_boundary():
    shapes = kernel_shapes(None, 4)
    parts = {p.name: p for p in step_model.rest_of_step(shapes, 1, {"qkv_proj", "o_proj", "lm_head"}, 7)}
    assert parts["all-reduce (attention, MLP)"].count == 2 * 48
    assert parts["kernel boundaries"].count == 7
    qkv = step_model.projection_bytes(shapes, 1)["qkv_proj"]
    assert qkv == (2048 * 1280 + 1 * (2048 + 1280)) * 2


def test_all_reduces_inside_a_kernel_leave_the_rest_of_the_step():
    shapes = kernel_shapes(None, 4)
    names = {p.name for p in step_model.rest_of_step(shapes, 1, {"all_reduce"}, 2)}
    assert "all-reduce (attention, MLP)" not in names and "sampling (greedy)" in names  # the token's all-gather stays


def test_whole_step_is_kernels_plus_rest_and_its_line_reads_as_the_issue_asks():
    shapes = kernel_shapes(None, 4)
    st = bench.step_cost(shapes, "decode", 1)
    assert st.step_seconds == pytest.approx(st.kernels_seconds + sum(p.step_seconds for p in st.rest))
    line = bench.step_line(st)
    pct = round(100 * st.limit_seconds / st.step_seconds)
    assert line == (
        f"decode step, batch 1: {st.step_seconds * 1e3:.3f} ms per token "
        f"(limit {st.limit_seconds * 1e3:.3f} ms, {pct}% of it)"
    )
    assert math.isfinite(st.tokens_per_s_per_chip) and st.tokens_per_s_per_chip > 0


def test_a_dense_models_silu_mul_is_in_the_rest_of_the_step_by_hand():
    """Llama 3.2 1B at TP 1, batch 1: silu(gate) * up reads gate and up and writes h, 3 x 8192 bf16 per layer, at one
    trn2 core's HBM bandwidth (362.5 GB/s), as the other parts without a kernel; one launch per dense layer. MoE models
    have none."""
    from pathlib import Path

    config = Path(__file__).parents[2] / "benchmarks" / "configs" / "llama-3.2-1b.json"
    shapes = kernel_shapes(str(config), 1)
    parts = {p.name: p for p in step_model.rest_of_step(shapes, 1, {"qkv_proj", "o_proj", "lm_head"}, 5)}
    silu = parts["dense MLP silu * up"]
    assert silu.count == 16
    assert silu.seconds == pytest.approx(3 * 8192 * 2 / 362.5e9)
    assert parts["kernel boundaries"].count == 5 + 16
    moe = {p.name for p in step_model.rest_of_step(kernel_shapes(None, 4), 1, set(), 5)}
    assert "dense MLP silu * up" not in moe


def test_fp8_checkpoint_limit_by_hand():
    # As the bf16 limit above, with the experts and the projections at 1 byte per weight: per layer attention
    # 4,718,592 B + its 4,718,592 / 16,384 = 288 block scales x 4 B; experts 8 x 3 x 2048 x 192 = 9,437,184 B + their
    # scales expanded along I, 8 x 3 x 192 x 16 blocks x 4 B = 294,912 B; the router (262,144) and KV cache (163,840)
    # stay bf16; x 48 layers, plus the bf16 LM head shard 77,791,232 x 2 B.
    per_layer = 4_718_592 + 288 * 4 + 9_437_184 + 294_912 + (262_144 + 163_840) * 2
    nbytes = 48 * per_layer + 77_791_232 * 2
    fp8 = replace(kernel_shapes(None, 4), fp8=True)
    assert step_model.limit_seconds(fp8, 1) == pytest.approx(nbytes / (2 * CORE_BW))


def test_the_bf16_batch_1_step_is_the_two_fused_blocks_per_layer():
    st = bench.step_cost(kernel_shapes(None, 4), "decode", 1)
    per_layer = {r.kernel for r in st.rows if r.passed and r.calls_per_layer}
    assert per_layer == {"attention_block_decode", "moe_block_decode"}
    assert {p.name for p in st.rest}.isdisjoint({"qkv_proj", "o_proj", "lm_head"})  # all covered by kernels
    # beyond FUSED_MAX_TOKENS sequences the ops one by one
    st8 = bench.step_cost(kernel_shapes(None, 4), "decode", 32)
    per_layer = {r.kernel for r in st8.rows if r.passed and r.calls_per_layer}
    assert {"linear.qkv_proj", "linear.o_proj", "attention_decode", "qk_norm_rope"} <= per_layer
    assert "attention_block_decode" not in per_layer


def test_the_fp8_batch_1_step_is_one_kernel_for_all_layers_then_the_lm_head():
    st = bench.step_cost(replace(kernel_shapes(None, 4), fp8=True), "decode", 1)
    counted = {
        r.kernel: (r.calls_per_layer, r.calls_per_step) for r in st.rows if r.calls_per_layer or r.calls_per_step
    }
    # every layer (attention half, all-reduce, MoE half, all-reduce) in one launch; the LM head stays bf16
    assert counted == {"decoder_layers_decode_fp8": (0, 1), "linear.lm_head": (0, 1)}
    assert all(r.passed for r in st.rows if r.kernel in counted)
    layers = next(r for r in st.rows if r.kernel == "decoder_layers_decode_fp8")
    assert "L=48" in layers.shapes and "TP=4" in layers.shapes
    # projections and the all-reduces are inside it: the rest holds no such part, and two boundaries
    assert {p.name for p in st.rest}.isdisjoint({"qkv_proj", "o_proj", "lm_head", "all-reduce (attention, MLP)"})
    boundaries = next(p for p in st.rest if p.name == "kernel boundaries")
    assert boundaries.count == 2
    assert st.kernels_seconds == pytest.approx(sum(r.estimated_seconds for r in st.rows if r.kernel in counted))
    assert bench.step_line(st).startswith("decode step with FP8 weights, batch 1: ")
