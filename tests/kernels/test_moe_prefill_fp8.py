"""kernels/moe_prefill_fp8.py: FP8 experts over blocks of tokens grouped by expert, against the per-slot FP8
reference (``moe_decode_fp8_ref``, which knows nothing of blocks), on one and two programs; each used expert's FP8
bytes read once per block; the model op choosing it for many tokens."""

from __future__ import annotations

import pytest
import torch
from vllm_nki_moe.kernels import moe_fp8, moe_prefill, moe_prefill_fp8

from nki_emulator import run
from vllm_nki_moe import ops
from vllm_nki_moe.ops import fp8
from vllm_nki_moe.tools.kernel_check.tolerances import assert_close


def _inputs(T, E, K, H, inter, B, dtype, seed=0, same_expert=None):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * inter, H, generator=g) * H**-0.5
    w2 = torch.randn(E, H, inter, generator=g) * inter**-0.5
    experts = fp8.quantize_experts(w13, w2)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    if same_expert is not None:
        ids[:, 0] = same_expert
        ids[:, 1:] = torch.where(ids[:, 1:] == same_expert, (same_expert + 1) % E, ids[:, 1:])
    w = torch.rand(T, K, generator=g) + 0.1
    w = w / w.sum(-1, keepdim=True)
    layout = moe_fp8.fp8_experts_kernel_layout(*experts)
    meta = moe_prefill.prefill_block_metadata(ids, w, E, B)
    return x, experts, layout, w, ids, meta


def _tolerance(dtype) -> str:
    return "bfloat16_matmul" if dtype == torch.bfloat16 else "float32_matmul"


@pytest.mark.parametrize(
    "T,E,K,H,inter,B,dtype",
    [
        (5, 8, 2, 256, 192, 8, torch.bfloat16),  # Qwen3-30B-A3B's per-rank I at TP 4 (two 96-row tiles)
        (40, 8, 3, 256, 384, 16, torch.float32),  # three 128-row tiles; fp32 activations widen the FP8 tiles
        (200, 6, 2, 128, 96, 256, torch.bfloat16),  # two 128-token sub-blocks per block
        (3, 6, 3, 128, 200, 8, torch.float32),  # I in two 100-row tiles: scale rows cross the tile boundary
        (33, 8, 2, 2048, 64, 16, torch.bfloat16),  # 16 scale blocks: gate/up slices over two PSUM banks
    ],
)
def test_matches_the_per_slot_fp8_reference(T, E, K, H, inter, B, dtype):
    x, _, layout, w, ids, meta = _inputs(T, E, K, H, inter, B, dtype)
    out, _ = run(moe_prefill_fp8.moe_prefill_fp8, x, *layout, *meta)
    assert out.dtype == dtype and out.shape == (T, H)
    assert_close(out, moe_fp8.moe_decode_fp8_ref(x, *layout, w, ids), _tolerance(dtype))
    assert_close(out, moe_prefill_fp8.moe_prefill_fp8_ref(x, *layout, *meta), _tolerance(dtype))


@pytest.mark.parametrize("T,B,same_expert", [(50, 16, None), (1, 8, None), (40, 16, 3)])
def test_two_programs_match_one_each_taking_every_other_block(T, B, same_expert):
    x, _, layout, w, ids, meta = _inputs(T, 8, 2, 256, 64, B, torch.bfloat16, seed=3, same_expert=same_expert)
    one, _ = run(moe_prefill_fp8.moe_prefill_fp8, x, *layout, *meta)
    two, rep = run(moe_prefill_fp8.moe_prefill_fp8[2], x, *layout, *meta)
    assert rep.num_programs == 2
    assert_close(two, moe_fp8.moe_decode_fp8_ref(x, *layout, w, ids), "bfloat16_matmul")
    assert_close(two, one, "bfloat16_matmul")  # a token's contributions add in another order


def test_reads_each_used_blocks_fp8_expert_once():
    """The weight bytes read are the used blocks' experts (FP8 bytes + scales), not one expert per slot: 32 tokens
    over 8 experts with K = 2 use 8 blocks of 16 where the decode kernel reads 64 experts."""
    T, E, K, H, inter, B = 32, 8, 2, 256, 64, 16
    x, _, layout, w, ids, meta = _inputs(T, E, K, H, inter, B, torch.bfloat16, seed=5)
    _, rep = run(moe_prefill_fp8.moe_prefill_fp8, x, *layout, *meta)
    _, decode_rep = run(moe_fp8.moe_decode_fp8, x, *layout, w, ids)
    blocks = int(meta[3][0])
    expert_bytes = sum(t[0].numel() * t.element_size() for t in layout)  # one expert's w13, s13, w2, s2
    # besides the weights, per block: B gathered rows, B output rows read by the scatter-add, its table row
    other = blocks * (2 * B * H * 2 + B * 8 + 4) + T * H * 2 + 4
    assert blocks * expert_bytes <= rep.hbm_read_bytes <= blocks * expert_bytes + other
    assert decode_rep.hbm_read_bytes >= T * K * expert_bytes > 3 * rep.hbm_read_bytes


def test_bad_input_is_named():
    x, _, layout, w, ids, meta = _inputs(4, 8, 2, 256, 64, 8, torch.bfloat16)
    with pytest.raises(ValueError, match=r"moe_prefill_fp8: w13/w2 must be uint8"):
        run(moe_prefill_fp8.moe_prefill_fp8, x, layout[0].float(), *layout[1:], *meta)
    with pytest.raises(ValueError, match=r"moe_prefill_fp8: hidden.dtype=.*float16"):
        run(moe_prefill_fp8.moe_prefill_fp8, x.half(), *layout, *meta)
    bad_tokens = torch.zeros(meta[1].shape[0], 200, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"moe_prefill_fp8: block_size=200"):
        run(moe_prefill_fp8.moe_prefill_fp8, x, *layout, meta[0], bad_tokens, meta[2], meta[3])


@pytest.mark.parametrize(
    "T,E,kernel",
    [(1, 4, "moe_decode_fp8"), (8, 32, "moe_decode_fp8"), (9, 32, "moe_prefill_fp8"), (130, 4, "moe_prefill_fp8")],
)
def test_the_op_picks_the_kernel_by_token_count_and_matches_the_torch_op(T, E, kernel, kernel_launches):
    """Few tokens read their K experts each (decode kernel: T * K <= E / 2); more, up to beyond one 128-token tile,
    go to the expert-grouped kernel; experts in the model layout are converted once."""
    assert fp8.use_fp8_decode(T, 2, E) == (kernel == "moe_decode_fp8")
    x, experts, _, w, ids, _ = _inputs(T, E, 2, 128, 64, 8, torch.float32, seed=6)
    launched = kernel_launches(fp8)
    emulated = ops.bind("emulator")
    got = emulated.moe_experts_fp8(x, *experts, w, ids.long())
    want = ops.bind("torch").moe_experts_fp8(x, *experts, w, ids.long())
    assert launched == [kernel]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
