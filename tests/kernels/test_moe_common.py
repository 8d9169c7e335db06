"""kernels/moe_common.py: the experts' kernel layout and its tiling rule."""

from __future__ import annotations

import pytest
import torch

import nki_emulator as emulator

emulator.install()

from vllm_nki_moe.kernels import moe_common as mc  # noqa: E402

from tests.kernels.moe_cases import (  # noqa: E402
    QWEN3_30B_A3B_TP8,
    SMALL_SHAPES,
    _experts,
)


# ----- layout ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,H,I,E,K", SMALL_SHAPES + [QWEN3_30B_A3B_TP8[:1] + (2048, 96, 2, 8)])
def test_experts_kernel_layout_round_trips(name, H, I, E, K):  # noqa: E741
    w13, w2 = _experts(H, I, E, torch.float32)
    w13k, w2k = mc.experts_kernel_layout(w13, w2)
    back13, back2 = mc.experts_model_layout(w13k, w2k)
    assert torch.equal(back13, w13) and torch.equal(back2, w2)


def test_experts_kernel_layout_puts_h_partition_major():
    w13, w2 = _experts(256, 64, 2, torch.float32)
    w13k, w2k = mc.experts_kernel_layout(w13, w2)  # HP=128, KT=2, IP=64, IT=1
    e, p, kt, q = 1, 5, 1, 7
    assert w13k[e, 0, p, kt, q] == w13[e, q, p * 2 + kt]  # gate row q
    assert w13k[e, 0, p, kt, 64 + q] == w13[e, 64 + q, p * 2 + kt]  # up row q
    assert w2k[e, 0, q, kt * 128 + p] == w2[e, p * 2 + kt, q]


@pytest.mark.parametrize("n", [257, 131])
def test_split_tiles_rejects_sizes_without_equal_partition_tiles(n):
    with pytest.raises(ValueError, match=f"H={n}; must split into"):
        mc.split_tiles(n, "test", "H")
