"""kernels/moe_nxdi.py: decode experts on NxD Inference's expert layout (the contest drop-in's) against the fp32
reference built from the model's layout, odd shapes, two programs, bad input."""

from __future__ import annotations

import pytest
import torch

from nki_emulator import install, run

install()

from vllm_nki_moe.kernels import moe_nxdi  # noqa: E402
from vllm_nki_moe.kernels.moe_common import slots_ref  # noqa: E402

from vllm_nki_moe.tools.kernel_check.tolerances import assert_close  # noqa: E402

KEYS = {torch.bfloat16: "bfloat16_matmul", torch.float32: "float32_matmul"}


def _inputs(T, E, K, H, inter, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    gate_up = (torch.randn(E, H, 2 * inter, generator=g) * H**-0.5).to(dtype)
    down = (torch.randn(E, inter, H, generator=g) * inter**-0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    w = torch.rand(T, K, generator=g) + 0.1
    return x, gate_up, down, w / w.sum(1, keepdim=True), ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "T,E,K,H,inter",
    [
        (1, 16, 8, 2048, 192),  # Qwen3-30B-A3B per rank at TP 4 (fewer experts): I in two 96-row chunks
        (3, 8, 2, 256, 200),  # I in two 100-row chunks
        (5, 6, 3, 128, 64),
    ],
)
def test_moe_decode_nxdi_matches_the_reference(T, E, K, H, inter, dtype):
    args = _inputs(T, E, K, H, inter, dtype)
    out, _ = run(moe_nxdi.moe_decode_nxdi, *args)
    assert out.dtype == dtype and out.shape == (T, H)
    assert_close(out, moe_nxdi.moe_decode_nxdi_ref(*args), KEYS[dtype])


def test_the_reference_reads_nxds_layout_as_nxdi_writes_it():
    """gate_up[e, h, i] = W_gate[e][i, h], gate_up[e, h, I + i] = W_up[e][i, h], down[e, i, h] = W_down[e][h, i]
    (NxDI's state-dict conversion): the reference equals the experts computed from the Hugging Face matrices."""
    E, H, inter = 4, 128, 32
    g = torch.Generator().manual_seed(3)
    w_gate, w_up = torch.randn(E, inter, H, generator=g), torch.randn(E, inter, H, generator=g)
    w_down = torch.randn(E, H, inter, generator=g)
    gate_up = torch.cat([w_gate.transpose(1, 2), w_up.transpose(1, 2)], dim=2)
    down = w_down.transpose(1, 2).contiguous()
    x, ids, w = torch.randn(2, H, generator=g), torch.tensor([[1, 3], [0, 1]], dtype=torch.int32), torch.rand(2, 2)
    want = torch.zeros(2, H)
    for t in range(2):
        for k in range(2):
            e = int(ids[t, k])
            h = torch.nn.functional.silu(w_gate[e] @ x[t]) * (w_up[e] @ x[t])
            want[t] += w[t, k] * (w_down[e] @ h)
    torch.testing.assert_close(moe_nxdi.moe_decode_nxdi_ref(x, gate_up, down, w, ids), want, rtol=1e-4, atol=1e-3)
    tokens = torch.tensor([0, 0, 1, 1])
    slots = slots_ref(x, gate_up.transpose(1, 2), down.transpose(1, 2), tokens, ids.reshape(-1).long(), w.reshape(-1))
    torch.testing.assert_close(slots, want, rtol=1e-4, atol=1e-3)


def test_two_programs_split_the_slots_and_match_one():
    args = _inputs(2, 8, 3, 256, 64, torch.bfloat16, seed=5)
    one, _ = run(moe_nxdi.moe_decode_nxdi, *args)
    two, _ = run(moe_nxdi.moe_decode_nxdi[2], *args)
    assert_close(two, one, "bfloat16_matmul")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: (a[0][:, :100], *a[1:]), r"H=100; must be a multiple of 128"),
        (lambda a: (a[0], a[1], a[2][:, :-1], *a[3:]), r"down.shape=\(4, 31, 128\); must be \(4, 32, 128\)"),
        (lambda a: (a[0], a[1].float(), *a[2:]), r"gate_up float32, down bfloat16; must be hidden's bfloat16"),
        (lambda a: (torch.zeros(129, 128, dtype=torch.bfloat16), *a[1:]), r"T=129; must be 1..128"),
    ],
    ids=["hidden-not-128", "down-shape", "dtype-mix", "too-many-tokens"],
)
def test_bad_input_is_named(change, match):
    args = change(_inputs(2, 4, 2, 128, 32, torch.bfloat16))
    with pytest.raises(ValueError, match=match):
        run(moe_nxdi.moe_decode_nxdi, *args)
