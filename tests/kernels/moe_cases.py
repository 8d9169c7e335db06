"""Shared shapes and input builders of the MoE kernel tests (test_moe_common, test_moe_decode, test_moe_block).

Weights are drawn in the model layout and converted with ``moe_common.experts_kernel_layout``."""

from __future__ import annotations

import torch

import nki_emulator as emulator

emulator.install()

from vllm_nki_moe.kernels import moe_common as mc  # noqa: E402

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
    w13k, w2k = mc.experts_kernel_layout(w13, w2)
    wts, ids = _routing(T, E, K, same_expert=same_expert)
    return (x, w13k, w2k, wts, ids), (w13, w2)


def _block_inputs(T, H, I, E, dtype):  # noqa: E741
    g = torch.Generator().manual_seed(SEED + 3)
    x = torch.randn(T, H, generator=g).to(dtype)
    res = torch.randn(T, H, generator=g).to(dtype)
    gamma = (1 + 0.1 * torch.randn(H, generator=g)).to(dtype)
    router = (torch.randn(E, H, generator=g) * H**-0.5 * 4).to(dtype)
    w13, w2 = _experts(H, I, E, dtype)
    w13k, w2k = mc.experts_kernel_layout(w13, w2)
    return (x, res, gamma, mc.router_kernel_layout(router), w13k, w2k), (router, w13, w2)


def _min_decode_bytes(T, H, I, K, dtype, experts_read):  # noqa: E741
    item = torch.tensor([], dtype=dtype).element_size()
    return experts_read * 3 * H * I * item + 2 * T * H * item + T * K * 8
