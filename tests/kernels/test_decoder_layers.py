"""kernels/decoder_layers.py: decoder layers with their all-reduces in one kernel, run on several emulated ranks at
once, against (1) the two fused kernels per layer in sequence with the ranks' outputs summed (the same arithmetic:
exact) and (2) the torch reference of the model's ops, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vllm_nki_moe.kernels import decoder_layers as kernel
from vllm_nki_moe.kernels import moe_fp8
from vllm_nki_moe.kernels.attention_block import attention_block_decode_fp8

import nki_emulator as emulator
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close

from .test_attention_block import _args as _attention_args
from .test_moe_fp8 import _block_inputs, _experts

D = 128


def _rank_args(ranks, layers, lens, hq, hk, H, E, K, inter, dtype, norm=True):
    """Each rank's kernel arguments: the step's hidden, residual, positions and paged-cache tables shared by all
    ranks; weights and caches of each (rank, layer) drawn apart."""
    step = _attention_args(np.random.default_rng(0), lens, hq, hk, H, dtype, seed=0)
    hidden, residual, positions, cos_sin, slots, tables, ctx = step[0], step[1], *step[7:9], *step[13:16]
    all_args = []
    for r in range(ranks):
        lists = {name: [] for name in kernel.LAYER_LISTS}
        for i in range(layers):
            seed = 1 + r * layers + i
            a = _attention_args(np.random.default_rng(0), lens, hq, hk, H, dtype, seed=seed)
            g = torch.Generator().manual_seed(seed)
            k_cache, v_cache = ((c.float() + 0.3 * torch.randn(c.shape, generator=g)).to(dtype) for c in a[11:13])
            _, _, post_norm, gate_t = _block_inputs(len(lens), E, H, dtype, seed=100 + seed)
            experts = moe_fp8.fp8_experts_kernel_layout(*_experts(E, H, inter, seed=200 + seed))
            values = [a[2], a[3], a[4], a[5], a[6], a[9], a[10], post_norm, gate_t, *experts, k_cache, v_cache]
            for name, v in zip(kernel.LAYER_LISTS, values):
                lists[name].append(v)
        all_args.append(
            [
                hidden,
                residual,
                *map(tuple, lists.values()),
                positions,
                cos_sin,
                slots,
                tables,
                ctx,
                1e-6,
                D**-0.5,
                K,
                norm,
                ranks,
            ]
        )
    return all_args


def _copy(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    return type(x)(c.clone() for c in x) if isinstance(x, (list, tuple)) else x


def _copies(args):
    return [[_copy(x) for x in a] for a in args]


def _fused_kernels_in_sequence(rank_args, programs):
    """Per layer: attention_block_decode_fp8 on every rank, their outputs summed in fp32 (rank order) and rounded;
    moe_block_decode_fp8 on every rank, summed likewise. Returns (out, r, k_caches per rank)."""
    states = _copies(rank_args)
    for s in states:  # the caches, replaced layer by layer
        s[15], s[16] = list(s[15]), list(s[16])
    hidden, residual = states[0][0], states[0][1]
    L = len(states[0][2])
    for i in range(L):
        parts = []
        for s in states:
            lay = [s[2 + j][i] for j in range(len(kernel.LAYER_LISTS))]
            fn = attention_block_decode_fp8 if programs == 1 else attention_block_decode_fp8[programs]
            (a, res, kc, vc), _ = emulator.run(
                fn,
                hidden,
                residual,
                *lay[:7][:1],
                *lay[1:5],
                *s[17:19],
                *lay[5:7],
                lay[13],
                lay[14],
                *s[19:22],
                s[22],
                s[23],
            )
            s[15][i], s[16][i] = kc, vc
            parts.append(a)
        hidden, residual = kernel._summed(parts, hidden.dtype), res
        parts = []
        for s in states:
            lay = [s[2 + j][i] for j in range(len(kernel.LAYER_LISTS))]
            fn = moe_fp8.moe_block_decode_fp8 if programs == 1 else moe_fp8.moe_block_decode_fp8[programs]
            (m, res), _ = emulator.run(fn, hidden, residual, *lay[7:13], s[22], s[24], s[25])
            parts.append(m)
        hidden, residual = kernel._summed(parts, hidden.dtype), res
    return hidden, residual, [s[15] for s in states]


def _run(rank_args, programs):
    fn = kernel.decoder_layers_decode_fp8 if programs == 1 else kernel.decoder_layers_decode_fp8[programs]
    return emulator.run_ranks(fn, [tuple(a) for a in _copies(rank_args)])


@pytest.mark.parametrize("programs", [1, 2])
def test_one_rank_equals_the_fused_kernels_in_sequence(programs):
    """One rank (no collective), 2 layers, 2 sequences, 4 query / 2 kv heads, hidden 256: the same arithmetic as
    the per-half kernels (partial sums added over the programs, rounded once), so equal bit for bit."""
    args = _rank_args(1, 2, [37, 5], 4, 2, 256, 8, 2, 64, torch.bfloat16)
    (((out, r, k_caches, v_caches), report),) = _run(args, programs)
    want_out, want_r, want_caches = _fused_kernels_in_sequence(args, programs)
    assert torch.equal(out, want_out) and torch.equal(r, want_r)
    assert all(torch.equal(a, b) for a, b in zip(k_caches, want_caches[0]))
    assert "all_reduce" not in report.ops


@pytest.mark.parametrize("programs", [1, 2])
def test_two_ranks_match_the_fused_kernels_with_summed_outputs(programs):
    """2 ranks x 2 layers: each program all-reduces its fp32 partials (one per half and program); against the
    per-half kernels whose rounded outputs are summed, close (one rounding instead of one per rank)."""
    args = _rank_args(2, 2, [37, 5], 4, 2, 256, 8, 2, 64, torch.bfloat16)
    results = _run(args, programs)
    want_out, want_r, want_caches = _fused_kernels_in_sequence(args, programs)
    for rank, ((out, r, k_caches, _), report) in enumerate(results):
        assert_close(out, want_out, "bfloat16_matmul")
        assert_close(r, want_r, "bfloat16_matmul")
        for a, b in zip(k_caches, want_caches[rank]):
            assert_close(a, b, "bfloat16_matmul")
        assert report.ops["all_reduce"] == 2 * 2 * programs  # two per layer, one per program
    assert torch.equal(results[0][0][0], results[1][0][0])  # every rank holds the same sum


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_torch_reference_of_the_models_ops(dtype):
    """Three ranks (an odd number), two layers, one sequence of 300 tokens, top-3 of 8 experts: against the torch
    ops in sequence with the all-reduces as sums."""
    args = _rank_args(3, 2, [300], 4, 1, 256, 8, 3, 64, dtype)
    results = _run(args, 2)
    want = kernel.decoder_layers_decode_fp8_ref(args)
    key = "float32_matmul" if dtype == torch.float32 else "bfloat16_matmul"
    for ((out, r, k_caches, v_caches), _), (w_out, w_r, w_k, w_v) in zip(results, want):
        assert_close(out, w_out, key)
        assert_close(r, w_r, key)
        for a, b in zip(k_caches + v_caches, w_k + w_v):
            assert_close(a, b, key)


def test_bad_layer_lists_are_named():
    args = _rank_args(1, 2, [9], 2, 1, 256, 8, 2, 64, torch.float32)[0]
    short = list(args)
    short[2 + kernel.LAYER_LISTS.index("w13s")] = short[2 + kernel.LAYER_LISTS.index("w13s")][:1]
    with pytest.raises(ValueError, match="w13s has 1 entries; must be a tuple of 2"):
        emulator.run(kernel.decoder_layers_decode_fp8, *short)
    wrong = _copies([args])[0]
    caches = list(wrong[2 + kernel.LAYER_LISTS.index("k_caches")])
    caches[1] = caches[1][:, :, :8]
    wrong[2 + kernel.LAYER_LISTS.index("k_caches")] = tuple(caches)
    with pytest.raises(ValueError, match="layer 1"):
        emulator.run(kernel.decoder_layers_decode_fp8, *wrong)
    ranks = list(args)
    ranks[-1] = 4
    with pytest.raises(emulator.NkiEmulatorError, match="rank 0 of 1"):
        emulator.run(kernel.decoder_layers_decode_fp8, *ranks)


def _op_args(layers, lens, dtype, hq=4, hk=2, H=256, E=8, K=2, inter=64):
    """``ops.decoder_layers_fp8``'s arguments: model-layout FP8 weights (e4m3fn + scale_inv), router [E, H]."""
    step = _attention_args(np.random.default_rng(0), lens, hq, hk, H, dtype, model_layout=True, seed=0)
    lists = [[] for _ in range(15)]
    for i in range(layers):
        a = _attention_args(np.random.default_rng(0), lens, hq, hk, H, dtype, model_layout=True, seed=1 + i)
        _, _, post_norm, gate_t = _block_inputs(len(lens), E, H, dtype, seed=50 + i)
        values = [
            a[2],
            a[3],
            a[4],
            a[5],
            a[6],
            a[9],
            a[10],
            post_norm,
            gate_t.t().contiguous(),
            *_experts(E, H, inter, seed=70 + i),
        ]
        values += [a[11].clone(), a[12].clone()]
        for column, v in zip(lists, values):
            column.append(v)
    return [step[0], step[1], *lists, step[7], step[8], *step[13:16], 1e-6, D**-0.5, K, True]


def test_the_op_runs_one_kernel_and_equals_the_ops_one_by_one(kernel_launches):
    """ops.decoder_layers_fp8 under the emulator (one launch) against the torch backend's sequence of the per-half
    composites, on the model's FP8 layouts; the caches are written in place by both."""
    from vllm_nki_moe import ops
    from vllm_nki_moe.ops import decoder_layers as layers_ops

    args = _op_args(2, [40], torch.float32)  # batch 1: where the fused MoE half applies (T * top_k <= E / 16)
    torch_args = _copies([args])[0]
    launched = kernel_launches(layers_ops)
    out, r = ops.bind("emulator").decoder_layers_fp8(*args)
    want, want_r = ops.bind("torch").decoder_layers_fp8(*torch_args)
    assert launched == ["decoder_layers_decode_fp8"]
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r, want_r, rtol=1e-4, atol=1e-4)
    k_caches, want_k = (
        args[2 + kernel.LAYER_LISTS.index("k_caches")],
        torch_args[2 + kernel.LAYER_LISTS.index("k_caches")],
    )
    for a, b in zip(k_caches, want_k):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_op_runs_its_sequence_where_a_layer_does_not_fit(kernel_launches):
    """Ten sequences: beyond the fused attention half's token limit, so no one-launch kernel (not an error)."""
    from vllm_nki_moe import ops
    from vllm_nki_moe.ops import decoder_layers as layers_ops

    args = _op_args(1, [5] * 10, torch.float32)
    launched = kernel_launches(layers_ops)
    reason = layers_ops._supports(*args)
    assert reason.startswith("layer 0: T=10")
    out, _ = ops.bind("emulator").decoder_layers_fp8(*args)
    assert launched == [] and out.shape == args[0].shape
