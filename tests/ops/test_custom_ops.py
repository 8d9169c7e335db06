"""Every op is a registered torch custom op: schema from its reference, fake implementation with the exact output
shapes and dtypes (checked by ``torch.library.opcheck`` against the real outputs), opaque to ``torch.compile``."""

from __future__ import annotations

import inspect

import pytest
import torch

from vllm_nki_moe import ops

# Odd sizes: 5 tokens, hidden 256 (the kernels' partition tiles), 3 q heads over 1 kv head of 32, 8 experts top-2.
T, H, HEADS, KV_HEADS, D, E, I, K = 5, 256, 3, 1, 32, 8, 64, 2  # noqa: E741
BLOCK, BLOCKS, EPS = 4, 6, 1e-6


def _inputs(name: str, g: torch.Generator) -> tuple:
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    x, w = randn(T, H), randn(H)
    q, k, v = randn(T, HEADS * D), randn(T, KV_HEADS * D), randn(T, KV_HEADS * D)
    positions = torch.arange(3, 3 + T)
    cache = ops.rope.rope_cos_sin_cache(D, 64, 10000.0)
    w13, w2 = 0.1 * randn(E, 2 * I, H), 0.1 * randn(E, H, I)
    weights, ids = ops.router.router_topk(randn(T, E), K, True)
    k_cache, v_cache = torch.zeros(BLOCKS, KV_HEADS, BLOCK, D), torch.zeros(BLOCKS, KV_HEADS, BLOCK, D)
    slots = torch.tensor([9, 10, 11, 12, -1])  # scattered blocks, one padding slot
    w_fp8 = ops.fp8.quantize(randn(130, H))
    w13_fp8 = [ops.fp8.quantize(e) for e in w13]
    w13_scales = torch.stack([ops.fp8.expand_rows(s, 0, 2 * I) for _, s in w13_fp8])  # the model's expanded scales
    w2_fp8 = [ops.fp8.quantize(e) for e in w2]
    fp8_experts = (
        torch.stack([q for q, _ in w13_fp8]),
        w13_scales,
        torch.stack([q for q, _ in w2_fp8]),
        torch.stack([ops.fp8.expand_cols(s, 0, I) for _, s in w2_fp8]),
    )
    # the fused FP8 attention half: head_dim 128 (one FP8 block per head, where its kernel applies), 2 q heads
    d128 = 128
    block_caches = [torch.zeros(BLOCKS, KV_HEADS, BLOCK, d128) for _ in range(2)]
    attention_block_fp8 = (
        *(randn(2, H), randn(2, H), w, EPS),
        *ops.fp8.quantize(0.1 * randn(4 * d128, H)),
        *(randn(d128), randn(d128), torch.tensor([9, 0]), ops.rope.rope_cos_sin_cache(d128, 64, 1e6)),
        *ops.fp8.quantize(0.1 * randn(H, 2 * d128)),
        *block_caches,
        *(torch.tensor([13, 20]), torch.tensor([[3, 2, 5], [5, 1, 0]]), torch.tensor([10, 1]), d128**-0.5),
    )
    # two layers of both FP8 halves at batch 1 (where the one-launch kernel applies), each its own weights and caches
    layer_lists = [[] for _ in range(15)]
    for _ in range(2):
        qkv, o = ops.fp8.quantize(0.1 * randn(4 * d128, H)), ops.fp8.quantize(0.1 * randn(H, 2 * d128))
        values = (w, *qkv, randn(d128), randn(d128), *o, w, randn(E, H), *fp8_experts)
        values += tuple(torch.zeros(BLOCKS, KV_HEADS, BLOCK, d128) for _ in range(2))
        for column, value in zip(layer_lists, values):
            column.append(value)
    decoder_layers_fp8 = (
        *(randn(1, H), torch.zeros(1, H), *layer_lists, torch.tensor([9]), ops.rope.rope_cos_sin_cache(d128, 64, 1e6)),
        *(torch.tensor([13]), torch.tensor([[3, 2, 5]]), torch.tensor([10]), EPS, d128**-0.5, K, True),
    )
    plain_caches = [torch.zeros(BLOCKS, KV_HEADS, BLOCK, d128) for _ in range(2)]
    attention_block = (
        *(randn(2, H), randn(2, H), w, EPS, 0.05 * randn(4 * d128, H)),
        *(randn(d128), randn(d128), torch.tensor([9, 0]), ops.rope.rope_cos_sin_cache(d128, 64, 1e6)),
        0.05 * randn(H, 2 * d128),
        *plain_caches,
        *(torch.tensor([13, 20]), torch.tensor([[3, 2, 5], [5, 1, 0]]), torch.tensor([10, 1]), d128**-0.5),
    )
    return {
        "attention_block": attention_block,
        "attention_block_fp8": attention_block_fp8,
        "decoder_layers_fp8": decoder_layers_fp8,
        "rms_norm": (x, w, EPS),
        "fused_add_rms_norm": (x, randn(T, H), w, EPS),
        "linear": (x, randn(130, H)),  # N across no tile boundary but not a multiple of anything
        "linear_fp8": (x, *w_fp8),
        "apply_rope": (q, k, positions, cache, D),
        "qk_norm_rope": (q, k, randn(D), randn(D), EPS, positions, cache, D),
        "silu_mul": (randn(T, 2 * I),),
        "router_topk": (randn(T, E), K, True),
        "router_gate_topk": (x, randn(E, H), K, True),
        "moe_experts": (x, w13, w2, weights, ids),
        "moe_experts_fp8": (x, *fp8_experts, weights, ids),
        "moe_block": (randn(1, H), randn(1, H), w, EPS, randn(E, H), w13, w2, K, True),
        "moe_block_fp8": (randn(1, H), randn(1, H), w, EPS, randn(E, H), *fp8_experts, K, True),
        "attention_prefill": (q, k, v, k_cache, v_cache, slots, D**-0.5),
        "attention_decode": (
            q[:2],
            k[:2],
            v[:2],
            k_cache,
            v_cache,
            torch.tensor([13, 20]),
            torch.tensor([[3, 2, 5], [5, 1, 0]]),
            torch.tensor([10, 1]),
            D**-0.5,
        ),
    }[name]


@pytest.mark.parametrize("backend", ["torch", "emulator"])
@pytest.mark.parametrize("name", ops.OP_NAMES + ops.COMPOSITE_OPS)
def test_custom_op_passes_opcheck_and_matches_its_binding(name, backend):
    opset = ops.bind(backend)
    key = opset.binding
    args = _inputs(name, torch.Generator().manual_seed(0))
    leaves = [t for a in args for t in (a if isinstance(a, list) else [a])]  # list arguments: one tensor per layer
    fp8_args = [a for a in leaves if isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn]
    # opcheck's schema test compares inputs with allclose, which float8 lacks: check those unmutated bit for bit here
    utils = {"test_utils": ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")}
    before = [a.view(torch.uint8).clone() for a in fp8_args]
    result = torch.library.opcheck(
        getattr(torch.ops.nki_moe, name).default, (*args, key), **(utils if fp8_args else {})
    )
    assert set(result.values()) == {"SUCCESS"}, result
    assert all(torch.equal(a.view(torch.uint8), b) for a, b in zip(fp8_args, before))
    expected = opset.implementations[name](*_inputs(name, torch.Generator().manual_seed(0)))
    got = getattr(opset, name)(*_inputs(name, torch.Generator().manual_seed(0)))
    for e, r in zip(*(o if isinstance(o, tuple) else (o,) for o in (expected, got))):
        torch.testing.assert_close(r, e, rtol=0, atol=0)


def test_schema_is_the_reference_signature_plus_the_binding():
    ops.bind("torch")
    schema = torch.ops.nki_moe.attention_decode.default._schema
    names = [a.name for a in schema.arguments]
    assert names == [*inspect.signature(ops.attention.attention_decode).parameters, "binding"]
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["k_cache", "v_cache"]  # the caches are written in place, declared so


@pytest.mark.parametrize("backend", ["torch", "emulator"])
def test_ops_trace_as_one_graph_without_breaks(backend):
    opset = ops.bind(backend)
    args = _inputs("moe_experts", torch.Generator().manual_seed(1))

    def layer(x, w13, w2, weights, ids):  # data-dependent work inside: routing counts, kernel block tables
        normed = opset.rms_norm(x, torch.ones(x.shape[1]), EPS)
        return opset.moe_experts(normed, w13, w2, weights, ids)

    explained = torch._dynamo.explain(layer)(*args)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), layer(*args), rtol=0, atol=0)


def _graph_ops(fn, *args) -> set[str]:
    """The ops of the one graph Dynamo captures from ``fn`` (fullgraph: a break fails)."""
    torch._dynamo.reset()  # every op's caller shares one code object: compiled alone, each would count as a recompile
    seen: set[str] = set()

    def backend(gm, example_inputs):
        seen.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch.compile(fn, fullgraph=True, backend=backend)(*args)
    return seen


@pytest.mark.parametrize("name", [n for n in ops.OP_NAMES if ops.SPECS[n].traceable])
def test_a_traceable_reference_traces_inline_and_matches_eager(name):
    """Unbound to a kernel, a traceable op is its reference's graph ops (fusable), not an opaque custom op."""
    opset = ops.bind("torch", host_ops=False)
    args = _inputs(name, torch.Generator().manual_seed(2))
    graph_ops = _graph_ops(getattr(opset, name), *args)
    assert not any("nki_moe" in op for op in graph_ops), graph_ops
    compiled = torch.compile(getattr(opset, name), fullgraph=True, backend="aot_eager")
    for got, want in zip(
        *(o if isinstance(o, tuple) else (o,) for o in (compiled(*args), getattr(opset, name)(*args)))
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["torch", "emulator"])
def test_kernel_ops_and_untraceable_ops_stay_one_custom_op_node_each(backend):
    opset = ops.bind(backend, host_ops=False) if backend == "torch" else ops.bind(backend)
    args = _inputs("moe_block", torch.Generator().manual_seed(3))
    graph_ops = _graph_ops(opset.moe_block, *args)
    if backend == "torch":  # the sequence: norm and router inline, the experts' host loop opaque
        assert [op for op in graph_ops if "nki_moe" in op] == ["nki_moe.moe_experts"], graph_ops
    else:  # the fused decode kernel: one node
        assert [op for op in graph_ops if "nki_moe" in op] == ["nki_moe.moe_block"], graph_ops
