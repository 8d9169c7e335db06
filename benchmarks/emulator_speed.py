"""Emulation wall time of representative kernels on Qwen3-30B-A3B per-rank shapes (TP=4), with the trn2 estimate.

Run: python benchmarks/emulator_speed.py
Shapes (DESIGN.md, "Kernels"): hidden 2048, 128 experts, top-8, expert intermediate 768 / TP=4 = 192 per rank.
Each kernel's output is checked against NumPy before its time is printed.
"""

from __future__ import annotations

import time

import numpy as np

import nki_emulator as emulator

emulator.install()

import ml_dtypes  # noqa: E402
import nki  # noqa: E402
import nki.isa as nisa  # noqa: E402
import nki.language as nl  # noqa: E402

HIDDEN = 2048  # Qwen3-30B-A3B hidden_size
NUM_EXPERTS = 128  # num_experts
TOP_K = 8  # num_experts_per_tok
INTER_PER_RANK = 768 // 4  # moe_intermediate_size / TP=4
P = 128
SEED = 0


@nki.jit
def decode_experts(x, gate_up, down, expert_ids, weights):
    """One token: out[1, H] = sum_j w_j * down_e(silu(gate_e(x)) * up_e(x)), experts e = expert_ids[0, j].

    x [H, 1] bf16 (H on partitions); gate_up [E, H, 2I] bf16; down [E, I, H] bf16; expert_ids [1, K] int32;
    weights [1, K] fp32. Only the selected experts' weights are read (runtime scalar offsets).
    """
    H, _ = x.shape
    E, _, I2 = gate_up.shape
    inter = I2 // 2
    K = expert_ids.shape[1]
    out = nl.ndarray((1, H), dtype=nl.float32, buffer=nl.shared_hbm)
    xs = []
    for k0 in range(0, H, P):
        t = nl.ndarray((P, 1), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x[k0 : k0 + P, :])
        xs.append(t)
    w = nl.ndarray((1, K), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=w, src=weights)
    acc = nl.ndarray((1, H), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(acc, 0.0)
    for j in range(K):
        eid = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=eid, src=expert_ids[0:1, j : j + 1])
        gu_ps = nl.ndarray((1, I2), dtype=nl.float32, buffer=nl.psum)
        for i, k0 in enumerate(range(0, H, P)):
            wt = nl.ndarray((P, I2), dtype=gate_up.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=wt, src=gate_up.ap([[I2, P], [1, I2]], offset=k0 * I2, scalar_offset=eid, indirect_dim=0))
            nisa.nc_matmul(dst=gu_ps, stationary=xs[i], moving=wt)
        act = nl.ndarray((1, inter), dtype=nl.float32, buffer=nl.sbuf)
        nisa.activation(dst=act, op=nl.silu, data=gu_ps[:, 0:inter])
        h = nl.ndarray((1, inter), dtype=nl.bfloat16, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=h, data1=act, data2=gu_ps[:, inter:I2], op=nl.multiply)
        hts = []
        for c0 in range(0, inter, P):
            cs = min(P, inter - c0)
            ht_ps = nl.ndarray((cs, 1), dtype=nl.bfloat16, buffer=nl.psum)
            nisa.nc_transpose(dst=ht_ps, data=h[:, c0 : c0 + cs])
            ht = nl.ndarray((cs, 1), dtype=nl.bfloat16, buffer=nl.sbuf)
            nisa.tensor_copy(dst=ht, src=ht_ps)
            hts.append((c0, cs, ht))
        for n0 in range(0, H, 512):
            o_ps = nl.ndarray((1, 512), dtype=nl.float32, buffer=nl.psum)
            for c0, cs, ht in hts:
                wd = nl.ndarray((cs, 512), dtype=down.dtype, buffer=nl.sbuf)
                nisa.dma_copy(
                    dst=wd, src=down.ap([[H, cs], [1, 512]], offset=c0 * H + n0, scalar_offset=eid, indirect_dim=0)
                )
                nisa.nc_matmul(dst=o_ps, stationary=ht, moving=wd)
            nisa.scalar_tensor_tensor(
                dst=acc[:, n0 : n0 + 512],
                data=o_ps,
                op0=nl.multiply,
                operand0=w[:, j : j + 1],
                op1=nl.add,
                operand1=acc[:, n0 : n0 + 512],
            )
    nisa.dma_copy(dst=out, src=acc)
    return out


def decode_experts_ref(x, gate_up, down, expert_ids, weights):
    xf = x.astype(np.float32)[:, 0]
    out = np.zeros(x.shape[0], dtype=np.float32)
    inter = gate_up.shape[2] // 2
    for j, e in enumerate(expert_ids[0]):
        gu = xf @ gate_up[e].astype(np.float32)
        h = (gu[:inter] / (1 + np.exp(-gu[:inter])) * gu[inter:]).astype(ml_dtypes.bfloat16).astype(np.float32)
        out += weights[0, j] * (h @ down[e].astype(np.float32))
    return out[None, :]


@nki.jit
def matmul_tiled(lhsT, rhs):
    K, M = lhsT.shape
    _, N = rhs.shape
    out = nl.ndarray((M, N), dtype=nl.float32, buffer=nl.shared_hbm)
    for m0 in range(0, M, P):
        for n0 in range(0, N, 512):
            ns = min(512, N - n0)
            acc = nl.ndarray((P, ns), dtype=nl.float32, buffer=nl.psum)
            for k0 in range(0, K, P):
                a = nl.ndarray((P, P), dtype=lhsT.dtype, buffer=nl.sbuf)
                b = nl.ndarray((P, ns), dtype=rhs.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=a, src=lhsT[k0 : k0 + P, m0 : m0 + P])
                nisa.dma_copy(dst=b, src=rhs[k0 : k0 + P, n0 : n0 + ns])
                nisa.nc_matmul(dst=acc, stationary=a, moving=b)
            res = nl.ndarray((P, ns), dtype=nl.float32, buffer=nl.sbuf)
            nisa.tensor_copy(dst=res, src=acc)
            nisa.dma_copy(dst=out[m0 : m0 + P, n0 : n0 + ns], src=res)
    return out


@nki.jit
def router_top8(x, w):
    """x [H, T] bf16 (H on partitions), w [H, E] bf16 -> top-8 expert ids [T, 8] (T <= 128)."""
    H, T = x.shape
    E = w.shape[1]
    ids = nl.ndarray((T, 8), dtype=nl.uint32, buffer=nl.shared_hbm)
    logits_ps = nl.ndarray((T, E), dtype=nl.float32, buffer=nl.psum)
    for k0 in range(0, H, P):
        xt = nl.ndarray((P, T), dtype=x.dtype, buffer=nl.sbuf)
        wt = nl.ndarray((P, E), dtype=w.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=xt, src=x[k0 : k0 + P, :])
        nisa.dma_copy(dst=wt, src=w[k0 : k0 + P, :])
        nisa.nc_matmul(dst=logits_ps, stationary=xt, moving=wt)
    logits = nl.ndarray((T, E), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=logits, src=logits_ps)
    top = nl.ndarray((T, 8), dtype=nl.float32, buffer=nl.sbuf)
    nisa.max8(dst=top, src=logits)
    idx = nl.ndarray((T, 8), dtype=nl.uint32, buffer=nl.sbuf)
    nisa.nc_find_index8(dst=idx, data=logits, vals=top)
    nisa.dma_copy(dst=ids, src=idx)
    return ids


def _bench(name: str, kernel, args, check) -> None:
    t0 = time.perf_counter()
    out, rep = emulator.run(kernel, *args)
    dt = time.perf_counter() - t0
    check(out)
    print(
        f"{name:44s} emulation {dt * 1e3:8.1f} ms | trn2 estimate {rep.estimated_seconds * 1e6:8.1f} us "
        f"(bound by {rep.bound_by}), HBM roofline {rep.hbm_roofline_seconds * 1e6:7.1f} us, "
        f"{sum(rep.instructions.values())} instructions"
    )


def main() -> None:
    rng = np.random.default_rng(SEED)
    bf16 = ml_dtypes.bfloat16
    x = rng.standard_normal((HIDDEN, 1)).astype(bf16)
    gate_up = (rng.standard_normal((NUM_EXPERTS, HIDDEN, 2 * INTER_PER_RANK)) * 0.02).astype(bf16)
    down = (rng.standard_normal((NUM_EXPERTS, INTER_PER_RANK, HIDDEN)) * 0.02).astype(bf16)
    ids = rng.choice(NUM_EXPERTS, size=(1, TOP_K), replace=False).astype(np.int32)
    wts = rng.dirichlet(np.ones(TOP_K)).astype(np.float32)[None, :]
    ref = decode_experts_ref(x, gate_up, down, ids, wts)
    _bench(
        "decode experts (T=1, H=2048, I=192, top-8)",
        decode_experts,
        (x, gate_up, down, ids, wts),
        lambda o: np.testing.assert_allclose(o, ref, rtol=2e-2, atol=2e-3),
    )

    a = rng.standard_normal((HIDDEN, 256)).astype(bf16)
    b = rng.standard_normal((HIDDEN, 2 * INTER_PER_RANK)).astype(bf16)
    mref = a.astype(np.float32).T @ b.astype(np.float32)
    _bench(
        "prefill matmul (T=256, H=2048 -> 2I=384)",
        matmul_tiled,
        (a, b),
        lambda o: np.testing.assert_allclose(o, mref, rtol=1e-3, atol=1e-2),
    )

    xr = rng.standard_normal((HIDDEN, 128)).astype(bf16)
    wr = rng.standard_normal((HIDDEN, NUM_EXPERTS)).astype(bf16)
    lref = xr.astype(np.float32).T @ wr.astype(np.float32)
    _bench(
        "router top-8 (T=128, H=2048, E=128)",
        router_top8,
        (xr, wr),
        lambda o: np.testing.assert_array_equal(np.sort(o, 1), np.sort(np.argsort(-lref, 1)[:, :8], 1)),
    )


if __name__ == "__main__":
    main()
