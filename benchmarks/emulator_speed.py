"""Emulation wall time of the project's kernels on Qwen3-30B-A3B per-rank shapes (TP=4), with the trn2 estimate.

Run: python benchmarks/emulator_speed.py [--repeat N]
Times the real kernels (``vllm_nki_moe.kernels``), each checked against its ``<kernel>_ref`` before its time is
printed; the best of N runs is reported (the machine is shared: the minimum is the least noisy figure).
Shapes (Qwen3-30B-A3B config.json): hidden 2048, 128 experts, top-8, moe_intermediate_size 768 / TP=4 = 192.
"""

from __future__ import annotations

import argparse
import time
import warnings

import nki_emulator as emulator

emulator.install()

import torch  # noqa: E402
from vllm_nki_moe.kernels import moe_common, moe_decode, rmsnorm, router  # noqa: E402

HIDDEN = 2048  # hidden_size
NUM_EXPERTS = 128  # num_experts
TOP_K = 8  # num_experts_per_tok
INTER_PER_RANK = 768 // 4  # moe_intermediate_size / TP=4
PREFILL_TOKENS = 128  # one partition tile of tokens
EPS = 1e-6  # rms_norm_eps
SEED = 0


def _bench(name: str, kernel, args, check, repeat: int) -> float:
    best, out, rep = float("inf"), None, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out, rep = emulator.run(kernel, *args)
        best = min(best, time.perf_counter() - t0)
    check(out)
    print(
        f"{name:46s} emulation {best * 1e3:8.1f} ms | trn2 estimate {rep.estimated_seconds * 1e6:8.1f} us "
        f"(bound by {rep.bound_by}), {sum(rep.instructions.values())} instructions"
    )
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per kernel; the best is reported")
    repeat = parser.parse_args().repeat
    warnings.simplefilter("ignore")  # language-rule warnings of the default release are not this script's subject
    g = torch.Generator().manual_seed(SEED)
    bf16 = torch.bfloat16
    total = 0.0

    # decode experts: one token, its top-8 experts' weights read at runtime offsets
    x = torch.randn(1, HIDDEN, generator=g).to(bf16)
    w13 = (torch.randn(NUM_EXPERTS, 2 * INTER_PER_RANK, HIDDEN, generator=g) * 0.02).to(bf16)
    w2 = (torch.randn(NUM_EXPERTS, HIDDEN, INTER_PER_RANK, generator=g) * 0.02).to(bf16)
    w13k, w2k = moe_common.experts_kernel_layout(w13, w2)
    ids = torch.randperm(NUM_EXPERTS, generator=g)[:TOP_K].to(torch.int32)[None, :]
    wts = torch.softmax(torch.randn(1, TOP_K, generator=g), dim=-1)
    args = (x, w13k, w2k, wts, ids)
    ref = moe_decode.moe_decode_ref(*args)
    total += _bench(
        "moe_decode (T=1, H=2048, I=192, top-8)",
        moe_decode.moe_decode,
        args,
        lambda o: torch.testing.assert_close(o.float(), ref.float(), rtol=2e-2, atol=2e-3),
        repeat,
    )

    # router: gate matmul + softmax + top-8 for a prefill tile
    xr = torch.randn(PREFILL_TOKENS, HIDDEN, generator=g).to(bf16)
    wr = (torch.randn(HIDDEN, NUM_EXPERTS, generator=g) * HIDDEN**-0.5).to(bf16)
    rw, rid = router.router_topk_matmul_ref(xr, wr, TOP_K, True)
    total += _bench(
        "router_topk_matmul (T=128, H=2048, E=128)",
        router.router_topk_matmul,
        (xr, wr, TOP_K, True),
        lambda o: torch.testing.assert_close(o[0].float(), rw.float(), rtol=1e-2, atol=1e-3),
        repeat,
    )

    # RMSNorm of a prefill tile
    xn = torch.randn(PREFILL_TOKENS, HIDDEN, generator=g).to(bf16)
    gamma = (1 + 0.1 * torch.randn(HIDDEN, generator=g)).to(bf16)
    nref = rmsnorm.rms_norm_ref(xn, gamma, EPS)
    total += _bench(
        "rms_norm (T=128, H=2048)",
        rmsnorm.rms_norm,
        (xn, gamma, EPS),
        lambda o: torch.testing.assert_close(o.float(), nref.float(), rtol=2e-2, atol=2e-2),
        repeat,
    )
    print(f"{'total':46s} emulation {total * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
