"""The rest of a forward step around the kernel cases, and the physical limit a step is compared with.

``kernels bench`` times every kernel case in the emulator's cost model; a serving step also runs what no kernel case
covers. Each such part is estimated here from its bytes and its source-cited hardware figure, or stated as an
assumption with its value, so that the step line adds up to a whole step:

- projections (q/k/v fused, o) and the LM head while they have no kernel case: their HBM roofline on one physical
  core (weights streamed once), an optimistic stand-in for the compiler's matmul;
- tensor-parallel all-reduces (after attention and after the MLP/MoE of every layer; unless a kernel does them, as
  the decoder-layers kernel does) and the all-gather of the sampled token: the collective model of AWS's intra-node
  collectives note;
- embedding gather, the final norm and greedy sampling over the rank's logits: their HBM bytes;
- a fixed cost per kernel boundary (an assumption: AWS publishes no figure).

The limit is the step's unavoidable HBM traffic (every weight it must read once, its KV cache) at the replica's full
HBM bandwidth (all its physical cores), so ``% of limit`` says how far a step is from the memory wall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nki_emulator import collectives, targets
from vllm_nki_moe.tools.kernel_check.shapes import KernelShapes


def logical_core_size() -> int:
    """Physical cores per logical core on the current target (trn2: 2, its default LNC, research/nki.md 2.2; trn1:
    1); one TP rank per logical core."""
    return targets.current().logical_core_size


# Assumption, not a published figure: the fixed cost of one kernel boundary inside a compiled graph (the next kernel's
# first DMA cannot start before its descriptors exist: ~600 ns per DMA instruction, research/nki.md 2.1, plus
# draining the previous kernel's engines). Printed with the table.
KERNEL_BOUNDARY_SECONDS = 2e-6
ACT_BYTES = 2  # bf16 activations and weights (the serving dtype)
LOGIT_BYTES = 4  # logits in fp32 for sampling


@dataclass(frozen=True)
class StepPart:
    name: str
    seconds: float  # per occurrence
    count: int  # occurrences per step
    basis: str  # how the time was estimated

    @property
    def step_seconds(self) -> float:
        return self.seconds * self.count


def _hbm_seconds(nbytes: float, cores: int = 1) -> float:
    return nbytes / (targets.current().hbm_bytes_per_s_per_core * cores)


def all_reduce_seconds(nbytes: int, ranks: int) -> float:
    """One all-reduce of ``nbytes`` over ``ranks`` ranks as a graph-level collective: the emulator's collective model
    (``nki_emulator.collectives``: Mesh/RDH hops at AWS's per-hop latency, plus each rank's traffic) through one
    logical core's HBM bandwidth (``logical_core_size()`` physical cores)."""
    return collectives.all_reduce_seconds(nbytes, ranks, logical_core_size())


def all_gather_seconds(nbytes_per_rank: int, ranks: int) -> float:
    """One all-gather (Mesh: one hop) of ``nbytes_per_rank`` from each of ``ranks`` ranks."""
    if ranks <= 1:
        return 0.0
    return collectives.COLLECTIVE_HOP_SECONDS + _hbm_seconds(2 * nbytes_per_rank * ranks, logical_core_size())


def projection_bytes(shapes: KernelShapes, tokens: int) -> dict[str, int]:
    """Per-rank HBM bytes of the projections no kernel covers: weights once, activations in and out."""
    h, d = shapes.hidden, shapes.head_dim
    qkv_out = (shapes.q_heads + 2 * shapes.kv_heads) * d
    o_in = shapes.q_heads * d
    vocab_rank = math.ceil(shapes.vocab / shapes.tp)
    return {
        "qkv_proj": (h * qkv_out + tokens * (h + qkv_out)) * ACT_BYTES,
        "o_proj": (o_in * h + tokens * (o_in + h)) * ACT_BYTES,
        "lm_head": vocab_rank * h * ACT_BYTES + tokens * h * ACT_BYTES + tokens * vocab_rank * LOGIT_BYTES,
    }


def rest_of_step(shapes: KernelShapes, tokens: int, covered: set[str], kernel_calls: int) -> list[StepPart]:
    """The parts of a step (``tokens`` tokens on one rank) outside the kernel cases; ``covered`` names the parts a
    kernel case already times (e.g. ``qkv_proj`` once a projection kernel exists), ``kernel_calls`` the kernel
    launches per step of the cases counted."""
    layers, tp = shapes.layers, shapes.tp
    parts = []
    proj = projection_bytes(shapes, tokens)
    roof = "HBM roofline on one core (no kernel yet)"
    for name, per in (("qkv_proj", layers), ("o_proj", layers), ("lm_head", 1)):
        if name not in covered:
            parts.append(StepPart(name, _hbm_seconds(proj[name]), per, roof))
    act = tokens * shapes.hidden * ACT_BYTES
    if "all_reduce" not in covered:  # else inside a kernel (kernels/decoder_layers.py), timed with it
        parts.append(
            StepPart("all-reduce (attention, MLP)", all_reduce_seconds(act, tp), 2 * layers, "collective model")
        )
    parts.append(StepPart("embedding gather", _hbm_seconds(2 * act), 1, "HBM bytes"))
    dense_layers = layers - shapes.moe_layers
    if dense_layers and shapes.intermediate and "silu_mul" not in covered:  # the dense MLP's silu(gate) * up
        inter = tokens * shapes.intermediate * ACT_BYTES
        parts.append(StepPart("dense MLP silu * up", _hbm_seconds(3 * inter), dense_layers, "HBM bytes (no kernel)"))
    if "final_norm" not in covered:
        parts.append(StepPart("final norm", _hbm_seconds(3 * act), 1, "HBM bytes"))
    logits = tokens * math.ceil(shapes.vocab / tp) * LOGIT_BYTES
    parts.append(
        StepPart("sampling (greedy)", _hbm_seconds(logits) + all_gather_seconds(tokens * 8, tp), 1, "HBM + collective")
    )
    launched = ("qkv_proj", "o_proj", "lm_head", "dense MLP silu * up")
    boundaries = kernel_calls + sum(p.count for p in parts if p.name in launched)
    parts.append(StepPart("kernel boundaries", KERNEL_BOUNDARY_SECONDS, boundaries, "assumption"))
    return parts


def expected_distinct_experts(experts: int, top_k: int, tokens: int) -> float:
    """E[number of experts chosen by at least one of ``tokens`` tokens], each picking ``top_k`` of ``experts``
    uniformly (a given expert is missed by one token with probability 1 - K/E)."""
    if experts == 0:  # a dense model
        return 0.0
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def limit_seconds(shapes: KernelShapes, tokens: int) -> float:
    """The memory wall of a decode step of ``tokens`` sequences on one rank: the bytes it must read once (the
    weights it touches: attention, router, the experts ``tokens`` tokens select in expectation under uniform routing,
    dense MLP layers, its LM-head shard; the KV cache of ``shapes.context_len`` tokens per sequence) at the logical
    core's HBM bandwidth (``logical_core_size()`` physical cores). Ranks run in parallel, so this is the replica's
    limit too."""
    h, d = shapes.hidden, shapes.head_dim
    attn = h * (shapes.q_heads + 2 * shapes.kv_heads) * d + shapes.q_heads * d * h
    experts = expected_distinct_experts(shapes.experts, shapes.top_k, tokens)
    moe = experts * 3 * h * shapes.moe_intermediate + h * shapes.experts
    dense = 3 * h * shapes.intermediate
    kv_cache = tokens * shapes.context_len * 2 * shapes.kv_heads * d
    weights = (
        shapes.layers * (attn + kv_cache)
        + shapes.moe_layers * moe
        + (shapes.layers - shapes.moe_layers) * dense
        + math.ceil(shapes.vocab / shapes.tp) * h
    )
    nbytes = weights * ACT_BYTES
    if shapes.fp8:  # FP8 checkpoint: 1 byte per expert and projection weight instead of ACT_BYTES, plus the scales
        blocks = math.ceil(h / 128)
        expert_weights = shapes.moe_layers * experts * 3 * h * shapes.moe_intermediate
        expert_scales = shapes.moe_layers * experts * 3 * shapes.moe_intermediate * blocks  # expanded along I
        proj_weights = shapes.layers * attn + (shapes.layers - shapes.moe_layers) * dense
        proj_scales = proj_weights // (128 * 128)  # one per 128 x 128 block
        nbytes -= (expert_weights + proj_weights) * (ACT_BYTES - 1) - 4 * (expert_scales + proj_scales)
    return _hbm_seconds(nbytes, logical_core_size())
