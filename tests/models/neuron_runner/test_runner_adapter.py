"""Our Qwen3-MoE behind vllm-neuron's runner-to-model contract (``vllm_nki_moe.models.neuron_runner``), on CPU.

(a) Against fakes of the upstream types it touches (``vllm_neuron.model.kv_cache.KVSpec`` / ``LayerSpec`` and the
``NeuronConfig`` fields it reads, ``tests/fakes/``): the KV spec, cache binding, config rejections, sampling.
(b) Driven the way ``NeuronModelRunner`` drives a model (``FakeNeuronModelRunner`` below, after
``jinhuang12/vllm-neuron:vllm_neuron/vllm/worker/neuron_model_runner.py`` and the onboarding guide
``aws-neuron/aws-neuron-sdk:vllm-neuron/docs/model-dev/onboarding-models.md``): registry lookup, ``from_configs``
under ``torch.device("meta")``, ``load_weights``, ``get_kv_spec`` / ``bind_kv_cache`` on runner-allocated caches full
of garbage, prefill padded to a bucket larger than the prompt (padding slots in the null block, as upstream pads
them), continuous-batching decode padded to a batch bucket (padding rows: null-block slot and table rows), blocks
handed out from a shuffled free list (block 0 is vLLM's null block), segmented prefill in chunks; greedy tokens must
equal Hugging Face's (float32 tiny models, exact token equality as in tests/model). The CPU serving path must not
import any of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from tests.conftest import REPO
from tests.models.test_dense import CONFIGS as DENSE_CONFIGS
from vllm_nki_moe.ops import moe as ops_moe
from vllm_nki_moe.tools import generate as gen
from vllm_nki_moe.tools import tiny_model

PROMPTS = ["Hello world, the quick brown fox", "def is_palindrome(text):", "A"]
NEW_TOKENS = 10
BLOCK_SIZE = 4  # small, so every prompt spans several (scattered) blocks
NUM_BLOCKS = 64  # block 0 is the null block; 3 requests x MAX_BLOCKS_PER_SEQ = 48 fit in the other 63
MAX_MODEL_LEN = 64
MAX_BLOCKS_PER_SEQ = MAX_MODEL_LEN // BLOCK_SIZE
PREFILL_BUCKETS = (16, 32)  # every prompt is shorter than its bucket: the tail is padding
DECODE_BATCH_BUCKET = 4  # 3 live requests + 1 padding row
SEGMENT = 4  # tokens per segmented-prefill chunk (padded to PREFILL_BUCKETS too)
NULL_BLOCK = 0  # vLLM's block pool reserves block 0; upstream remaps it to -1 in block tables
# Upstream's padding slot: "Read-side sentinel for block tables; write-side padding uses NULL_BLOCK_ID" (NULL_BLOCK_ID =
# 0, PAD_SLOT_ID = -1 for tables; neuron_model_runner.py, jinhuang12/vllm-neuron@051f877, module constants), so padded
# tokens write their K/V into the null block, which no table reads. -1 (vLLM's GPU convention) is skipped by our ops.
PAD_SLOT = NULL_BLOCK * BLOCK_SIZE
ODS_GREEDY = {"on_device_sampling_config": {"all_greedy": True}}
CPU_SAMPLING = {"on_device_sampling_config": None}
ODS_DEFAULT: dict = {}  # key absent: upstream turns on-device sampling on, not all-greedy (params decide)


# ---------------------------------------------------------------------------------------------------------------------
# The runner


class FakeNeuronModelRunner:
    """What ``NeuronModelRunner`` does with a model, on CPU, with its tensors' shapes and conventions."""

    def __init__(
        self,
        vllm_config,
        neuron_config: dict,
        *,
        seed: int = 0,
        segment: int | None = None,
        compile: bool = False,
        pad_slot: int = PAD_SLOT,
    ) -> None:
        from vllm_neuron.model.neuron_config import NeuronConfig

        self.compile = compile
        self.pad_slot = pad_slot
        self.vllm_config = vllm_config
        self.neuron_config = NeuronConfig.from_dict(neuron_config)
        self.segment = segment
        self.generator = torch.Generator().manual_seed(seed)
        self.free = [b for b in torch.randperm(NUM_BLOCKS, generator=self.generator).tolist() if b != NULL_BLOCK]
        self.tables: dict[int, list[int]] = {}

    def load_model(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.models.registry import ModelRegistry

        model_config = self.vllm_config.model_config
        with set_current_vllm_config(self.vllm_config):
            model_cls, _ = ModelRegistry.resolve_model_cls(model_config.architecture, model_config=model_config)
            with torch.device("meta"):
                self.model = model_cls.from_configs(model_config.hf_config, self.neuron_config)
            self.model.load_weights(model_config.model, torch.device("cpu"), self.vllm_config.load_config.download_dir)
            self.model = self.model.to("cpu")
        # Upstream compiles the model per bucket with torch.compile (its neuron_libtorch backends) and refuses eager
        # execution; aot_eager traces the same way (Dynamo, then AOTAutograd's functionalisation) without a device.
        self.step = (
            torch.compile(self.model, fullgraph=True, backend="aot_eager", dynamic=False)
            if self.compile
            else self.model
        )

    def initialize_kv_cache(self) -> dict[str, list[torch.Tensor]]:
        """Device memory is not zeroed: every cache starts as finite garbage, which only real slots may overwrite."""
        self.spec = self.model.get_kv_spec()
        shape = lambda s: (NUM_BLOCKS, s.num_kv_heads, BLOCK_SIZE, s.head_size)  # noqa: E731
        self.caches = {
            s.name: [torch.randn(shape(s), generator=self.generator).to(s.dtype) for _ in range(2)]
            for s in self.spec.layers
        }
        self.initial = {name: [t.clone() for t in pair] for name, pair in self.caches.items()}
        self.model.bind_kv_cache(self.caches)
        return self.caches

    def _slots(self, req: int, positions: list[int]) -> list[int]:
        table = self.tables.setdefault(req, [])
        while len(table) * BLOCK_SIZE <= max(positions):
            table.append(self.free.pop())
        return [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]

    def _table_row(self, req: int | None) -> list[int]:
        row = self.tables.get(req, []) if req is not None else []
        return row + [NULL_BLOCK] * (MAX_BLOCKS_PER_SEQ - len(row))

    def _metadata(self, rows: list[list[int]], slots: list[int], max_query_len: int, *, cached: int, segment: int):
        table = torch.tensor(rows, dtype=torch.int32)
        table = torch.where(table == NULL_BLOCK, torch.full_like(table, -1), table)  # _remap_null_block_to_sentinel
        entry = {
            "block_table_tensor": table,
            "slot_mapping": torch.tensor(slots, dtype=torch.int64),
            "max_query_len": max_query_len,
            "block_size": BLOCK_SIZE,
            "max_blocks_per_seq": MAX_BLOCKS_PER_SEQ,
            "decode_token_threshold": 1,
            "cached_seq_len": torch.tensor([[cached]], dtype=torch.int32),
            "kv_segment_size": segment,
        }
        return {s.name: entry for s in self.spec.layers}  # one cache group: every layer reads the same entry

    def _forward(self, ids: list[int], positions: list[int], meta: dict, sampling_positions: list[int]) -> list[int]:
        num_reqs = len(sampling_positions)
        greedy_params = torch.tensor([[-1.0, 1.0, 0.0]] * num_reqs)  # build_sampling_params_tensor's defaults
        ods = self.neuron_config.on_device_sampling_config is not None
        out = self.step(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int32),
            attn_metadata=meta,
            sampling_positions=torch.tensor(sampling_positions, dtype=torch.int64),
            sampling_params=greedy_params if ods else None,
            spec_decode_metadata=None,
            logit_mask=None,
            rank=torch.tensor(0, dtype=torch.int32),
            inputs_embeds=None,
            is_token_ids=None,
        )
        if ods:
            sampled, logits = out
            assert sampled.dtype == torch.int32 and sampled.shape == (num_reqs,)
            assert logits is None  # max_logprobs 0: no logits back
            return sampled.tolist()
        assert out.shape == (num_reqs, self.vllm_config.model_config.get_vocab_size())
        return out.argmax(dim=-1).tolist()  # the runner's CPU sampler, greedy

    def _prefill_chunk(self, req: int, tokens: list[int], start: int, *, segment: int) -> int:
        positions = list(range(start, start + len(tokens)))
        slots = self._slots(req, positions)
        bucket = next(b for b in PREFILL_BUCKETS if b > len(tokens))
        pad = bucket - len(tokens)
        meta = self._metadata(
            [self._table_row(req)], slots + [self.pad_slot] * pad, len(tokens), cached=start, segment=segment
        )
        return self._forward(tokens + [0] * pad, positions + [0] * pad, meta, [len(tokens) - 1])[0]

    def prefill(self, req: int, prompt: list[int]) -> int:
        if self.segment is None:
            return self._prefill_chunk(req, prompt, 0, segment=0)
        for start in range(0, len(prompt), self.segment):
            token = self._prefill_chunk(req, prompt[start : start + self.segment], start, segment=self.segment)
        return token  # the last chunk's sample is the first new token; earlier ones are discarded

    def decode(self, live: list[tuple[int, int, int]]) -> list[int]:
        """``live``: (request, last token, its position); padded to DECODE_BATCH_BUCKET rows."""
        pad = DECODE_BATCH_BUCKET - len(live)
        ids = [tok for _, tok, _ in live] + [0] * pad
        positions = [pos for _, _, pos in live] + [0] * pad
        slots = [self._slots(req, [pos])[0] for req, _, pos in live] + [self.pad_slot] * pad
        rows = [self._table_row(req) for req, _, _ in live] + [self._table_row(None)] * pad
        meta = self._metadata(rows, slots, 1, cached=0, segment=0)
        return self._forward(ids, positions, meta, list(range(len(live))))

    def warm_up(self, *, then_fail_on_recompile: bool = True) -> None:
        """One padding-only step per bucket (every slot a padding slot), then recompiles are errors, as
        upstream's runner sets ``torch.compiler.set_stance("fail_on_recompile")`` after its warm-up."""
        for bucket in PREFILL_BUCKETS:
            slots = [self.pad_slot] * bucket
            meta = self._metadata([self._table_row(None)], slots, bucket, cached=0, segment=self.segment or 0)
            self._forward([0] * bucket, [0] * bucket, meta, [bucket - 1])
        rows = [self._table_row(None)] * DECODE_BATCH_BUCKET
        meta = self._metadata(rows, [self.pad_slot] * DECODE_BATCH_BUCKET, 1, cached=0, segment=0)
        self._forward([0] * DECODE_BATCH_BUCKET, [0] * DECODE_BATCH_BUCKET, meta, list(range(3)))
        if then_fail_on_recompile:
            torch.compiler.set_stance("fail_on_recompile")

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Prefill each request (one per step, as upstream's prefill kernels take one sequence), then decode them
        together, continuous batching; greedy, EOS ignored."""
        out = [[self.prefill(req, prompt)] for req, prompt in enumerate(prompts)]
        while any(len(tokens) < new_tokens for tokens in out):
            live = [(r, out[r][-1], len(prompts[r]) + len(out[r]) - 1) for r in range(len(prompts))]
            live = [entry for entry in live if len(out[entry[0]]) < new_tokens]
            for (req, _, _), token in zip(live, self.decode(live)):
                out[req].append(token)
        return out

    def untouched_blocks(self) -> list[int]:
        used = {b for table in self.tables.values() for b in table}
        return [b for b in range(NUM_BLOCKS) if b not in used]


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def hf_reference(make_model):
    cache: dict = {}

    def get(model_dir):
        if model_dir not in cache:
            cache[model_dir] = gen.hf_greedy(model_dir, PROMPTS, NEW_TOKENS)
        return cache[model_dir]

    return get


def _vllm_config(model_dir):
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs

    from vllm_nki_moe import plugin

    config = EngineArgs(
        model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN
    ).create_engine_config()
    # Our general plugin, as vLLM runs it in every process (the worker's included) on our Neuron platform; the fake_sdk
    # fixture gives each test its own copy of the registry, and vLLM runs general plugins once per process (building
    # the config above may run them, as on this CPU platform), so register here, as on a Neuron worker.
    with mock.patch.object(plugin, "serving_on_neuron", lambda: True):
        plugin.register_models()
    with set_current_vllm_config(config):
        gen._init_distributed()  # vLLM's TP/PP groups for one process, as the worker sets them up
    return config


def _prompt_ids(model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [tokenizer(p).input_ids for p in PROMPTS]


def _run(
    model_dir,
    kernels: str,
    neuron_config: dict,
    monkeypatch,
    *,
    segment: int | None = None,
    compile=False,
    strict=False,
    pad_slot=PAD_SLOT,
):
    monkeypatch.setenv("VLLM_NKI_MOE_KERNELS", kernels)  # ops.bind() at model construction reads it
    runner = FakeNeuronModelRunner(
        _vllm_config(model_dir), neuron_config, segment=segment, compile=compile, pad_slot=pad_slot
    )
    runner.load_model()
    runner.initialize_kv_cache()
    if compile:
        torch._dynamo.reset()
        runner.warm_up(then_fail_on_recompile=strict)
    try:
        tokens = runner.generate(_prompt_ids(model_dir), NEW_TOKENS)
    finally:
        torch.compiler.set_stance("default")
    return runner, tokens


# ---------------------------------------------------------------------------------------------------------------------
# (b) runner-driven generation vs Hugging Face


@pytest.mark.parametrize(
    "kernels,neuron_config",
    [("torch", ODS_GREEDY), ("torch", CPU_SAMPLING), ("torch", ODS_DEFAULT), ("emulator", ODS_GREEDY)],
    ids=["torch-ods-greedy", "torch-cpu-sampling", "torch-ods-default-params", "emulator-ods-greedy"],
)
def test_runner_driven_generation_matches_hf_greedy(
    kernels, neuron_config, fake_sdk, tiny_model_dir, hf_reference, monkeypatch
):
    runner, tokens = _run(tiny_model_dir, kernels, neuron_config, monkeypatch)
    assert type(runner.model).__name__ == "NeuronQwen3MoeForCausalLM"
    experts = runner.model.model.layers[0].mlp.experts
    if kernels == "emulator":
        assert {"attention_prefill", "attention_decode"} <= set(runner.model.opset.kernel_ops)
        # the experts' one copy is the kernels' layout, converted at load (ops.moe.prepare_experts_for_kernels)
        assert ops_moe.layout_of(experts.w13_weight) == ops_moe.KERNEL_LAYOUT and experts.w13_weight.dim() == 5
    else:  # the references read the model's layout; vLLM's CPU fused MoE its prepacked one
        assert ops_moe.layout_of(experts.w13_weight) in (ops_moe.MODEL_LAYOUT, ops_moe.PACKED_LAYOUT)
    assert tokens == hf_reference(tiny_model_dir)


@pytest.mark.parametrize("segment", [None, SEGMENT], ids=["whole-prefill", "segmented-prefill"])
@pytest.mark.parametrize("kernels", ["torch", "emulator"])
def test_compiled_per_bucket_as_one_graph_matches_hf_greedy(
    kernels, segment, fake_sdk, tiny_model_dir, hf_reference, monkeypatch
):
    """fullgraph=True: a graph break anywhere in the runner-facing forward fails the run."""
    _, tokens = _run(tiny_model_dir, kernels, ODS_GREEDY, monkeypatch, segment=segment, compile=True)
    assert tokens == hf_reference(tiny_model_dir)


@pytest.mark.parametrize("segment", [None, SEGMENT], ids=["whole-prefill", "segmented-prefill"])
@pytest.mark.parametrize("kernels", ["torch", "emulator"])
def test_no_recompile_after_warm_up_across_prompt_lengths(
    kernels, segment, fake_sdk, tiny_model_dir, hf_reference, monkeypatch
):
    """Prompts of three lengths in one prefill bucket, then decode, under fail_on_recompile after warm-up: the phase
    and every kernel shape come from the bucket (describe_step), never from the request."""
    _, tokens = _run(tiny_model_dir, kernels, ODS_GREEDY, monkeypatch, segment=segment, compile=True, strict=True)
    assert tokens == hf_reference(tiny_model_dir)


@pytest.mark.parametrize("kernels", ["torch", "emulator"])
def test_segmented_prefill_in_padded_chunks_matches_hf_greedy(
    kernels, fake_sdk, tiny_model_dir, hf_reference, monkeypatch
):
    _, tokens = _run(tiny_model_dir, kernels, ODS_GREEDY, monkeypatch, segment=SEGMENT)
    assert tokens == hf_reference(tiny_model_dir)


@pytest.mark.parametrize(
    "name,kernels,compile",
    [
        ("qwen3-tied-gqa4", "torch", False),
        ("llama-3.2-like", "torch", False),
        ("llama-3.2-like", "torch", True),
        ("qwen3-tied-gqa4", "emulator", False),
        ("llama-3.2-like", "emulator", False),
    ],
)
def test_dense_architectures_under_the_runner_match_hf_greedy(
    name, kernels, compile, fake_sdk, make_model, hf_reference, monkeypatch
):
    """Qwen3 and Llama 3.x through the same runner contract: the registry resolves our runner class for each
    architecture, and the meta-built model's RoPE table is recomputed at load with the config's scaling (llama3 here:
    a default table would change the tokens)."""
    arch, overrides = DENSE_CONFIGS[name]
    model_dir = make_model(overrides, arch=arch)
    runner, tokens = _run(model_dir, kernels, ODS_GREEDY, monkeypatch, compile=compile, strict=compile)
    assert type(runner.model).__name__ == f"Neuron{tiny_model.ARCHS[arch][1]}"
    assert not hasattr(runner.model.model.layers[0].mlp, "experts")
    if kernels == "emulator":
        assert {"attention_prefill", "attention_decode", "linear"} <= set(runner.model.opset.kernel_ops)
    assert tokens == hf_reference(model_dir)


def test_dense_layers_and_unnormalised_routing_match_hf_greedy(fake_sdk, make_model, hf_reference, monkeypatch):
    model_dir = make_model({"num_hidden_layers": 3, "mlp_only_layers": [1], "norm_topk_prob": False})
    _, tokens = _run(model_dir, "torch", ODS_GREEDY, monkeypatch)
    assert tokens == hf_reference(model_dir)


# MQA (1 kv head), head_dim 32, tied embeddings (one parameter shared by embed_tokens and lm_head through
# materialisation), every other layer sparse (tests/models/test_parity_hf.py's "wide-router-mqa").
WIDE_ROUTER_MQA = {
    "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 1, "head_dim": 32, "num_experts": 16,
    "num_experts_per_tok": 4, "moe_intermediate_size": 48, "intermediate_size": 160, "num_hidden_layers": 4,
    "decoder_sparse_step": 2, "tie_word_embeddings": True, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
}  # fmt: skip


@pytest.mark.parametrize("kernels", ["torch", "emulator"])
def test_mqa_tied_embeddings_match_hf_greedy(kernels, fake_sdk, make_model, hf_reference, monkeypatch):
    model_dir = make_model(WIDE_ROUTER_MQA)
    runner, tokens = _run(model_dir, kernels, ODS_GREEDY, monkeypatch)
    assert runner.model.lm_head.weight is runner.model.model.embed_tokens.weight
    assert tokens == hf_reference(model_dir)


def test_prompt_embeds_rows_replace_token_embeddings(fake_sdk, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("VLLM_NKI_MOE_KERNELS", "torch")
    runner = FakeNeuronModelRunner(_vllm_config(tiny_model_dir), CPU_SAMPLING)
    runner.load_model()
    runner.initialize_kv_cache()
    prompt = _prompt_ids(tiny_model_dir)[0]
    meta = runner._metadata([runner._table_row(0)], runner._slots(0, list(range(len(prompt)))), len(prompt), cached=0,
                            segment=0)  # fmt: skip
    ids, positions, last = torch.tensor(prompt), torch.arange(len(prompt), dtype=torch.int32), torch.tensor([5])
    reference = runner.model(ids, positions, meta, last)
    embeds = runner.model.model.embed_input_ids(ids)
    zero_ids = torch.zeros_like(ids)  # every row comes from inputs_embeds
    from_embeds = runner.model(zero_ids, positions, meta, last, inputs_embeds=embeds, is_token_ids=ids < 0)
    torch.testing.assert_close(from_embeds, reference, rtol=0, atol=0)


@pytest.mark.parametrize("pad_slot", [PAD_SLOT, -1], ids=["null-block-padding", "minus-one-padding"])
@pytest.mark.parametrize("kernels", ["torch", "emulator"])
def test_padding_writes_only_the_null_block_and_unallocated_blocks_stay_untouched(
    kernels, pad_slot, fake_sdk, tiny_model_dir, hf_reference, monkeypatch
):
    runner, tokens = _run(tiny_model_dir, kernels, ODS_GREEDY, monkeypatch, pad_slot=pad_slot)
    assert tokens == hf_reference(tiny_model_dir)  # whatever padding wrote into the null block, no table reads it
    untouched = runner.untouched_blocks()
    assert NULL_BLOCK in untouched and len(untouched) > NUM_BLOCKS // 2
    if pad_slot == PAD_SLOT:  # upstream's padding lands in the null block; -1 slots are skipped, nothing lands
        untouched.remove(NULL_BLOCK)
    for name, (k_cache, v_cache) in runner.caches.items():
        k0, v0 = runner.initial[name]
        assert torch.equal(k_cache[untouched], k0[untouched]) and torch.equal(v_cache[untouched], v0[untouched])
        if pad_slot == PAD_SLOT:
            assert not torch.equal(k_cache[NULL_BLOCK], k0[NULL_BLOCK])
        used = [b for b in range(NUM_BLOCKS) if b not in runner.untouched_blocks()]
        assert not torch.equal(k_cache[used], k0[used])  # the real tokens did land in the runner's tensors


def test_blocks_of_a_request_are_scattered(fake_sdk, tiny_model_dir, monkeypatch):
    runner, _ = _run(tiny_model_dir, "torch", ODS_GREEDY, monkeypatch)
    tables = list(runner.tables.values())
    assert all(len(t) >= 3 for t in tables)
    assert any(any(b - a != 1 for a, b in zip(t, t[1:])) for t in tables)


# ---------------------------------------------------------------------------------------------------------------------
# (a) the contract's pieces against the fakes


@pytest.fixture
def built(fake_sdk, tiny_model_dir, monkeypatch):
    """A model as the runner holds it after load_model (torch ops)."""
    monkeypatch.setenv("VLLM_NKI_MOE_KERNELS", "torch")
    runner = FakeNeuronModelRunner(_vllm_config(tiny_model_dir), ODS_GREEDY)
    runner.load_model()
    return runner


def test_registry_resolves_a_class_with_from_configs_that_builds_on_meta(fake_sdk, tiny_model_dir, monkeypatch):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.models.registry import ModelRegistry
    from vllm_neuron.model.neuron_config import NeuronConfig

    monkeypatch.setenv("VLLM_NKI_MOE_KERNELS", "torch")
    vllm_config = _vllm_config(tiny_model_dir)
    model_config = vllm_config.model_config
    cls, _ = ModelRegistry.resolve_model_cls(model_config.architecture, model_config=model_config)
    assert f"{cls.__module__}.{cls.__qualname__}" == "vllm_nki_moe.models.neuron_runner.model.NeuronQwen3MoeForCausalLM"
    with set_current_vllm_config(vllm_config), torch.device("meta"):
        model = cls.from_configs(model_config.hf_config, NeuronConfig())
        by_keyword = cls.from_configs(hf_config=model_config.hf_config, text_neuron_config=NeuronConfig())
    assert all(p.is_meta for p in model.parameters())
    assert type(by_keyword) is type(model)


def test_load_weights_materialises_every_parameter_from_the_checkpoint(built, tiny_model_dir):
    from safetensors.torch import load_file

    model = built.model
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    checkpoint = load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
    params = dict(model.named_parameters())  # (vLLM's CPU platform repacks linear weights: compare the others)
    name = "model.layers.0.input_layernorm.weight"
    assert torch.equal(params[name], checkpoint[name])
    # TP 1: every expert's whole tensors, stacked, then held as the bound experts op reads them (one copy)
    num_experts = model.model.layers[0].mlp.experts.w13_weight.shape[0]
    prefix = "model.layers.0.mlp.experts"
    w13 = torch.stack(
        [
            torch.cat([checkpoint[f"{prefix}.{e}.gate_proj.weight"], checkpoint[f"{prefix}.{e}.up_proj.weight"]])
            for e in range(num_experts)
        ]
    )
    w2 = torch.stack([checkpoint[f"{prefix}.{e}.down_proj.weight"] for e in range(num_experts)])
    held = (params[f"{prefix}.w13_weight"], params[f"{prefix}.w2_weight"])
    if ops_moe.layout_of(held[0]) == ops_moe.PACKED_LAYOUT:  # vLLM's CPU ops loaded: cpu_fused_moe's prepacked copy
        w13, w2 = ops_moe.pack_experts(w13, w2)
    assert torch.equal(held[0], w13) and torch.equal(held[1], w2)
    attn = model.model.layers[0].self_attn
    assert torch.isfinite(attn.cos_sin_cache).all() and attn.cos_sin_cache[0, 0] == 1.0  # cos(0), recomputed


def test_kv_spec_names_each_layer_with_per_rank_kv_heads(built):
    from vllm_neuron.model.kv_cache import KVSpec, LayerSpec

    spec = built.model.get_kv_spec()
    hf = built.vllm_config.model_config.hf_config
    assert isinstance(spec, KVSpec) and all(isinstance(s, LayerSpec) for s in spec.layers)
    assert [s.name for s in spec.layers] == [f"layers.{i}.self_attn" for i in range(hf.num_hidden_layers)]
    assert {(s.num_kv_heads, s.head_size, s.dtype) for s in spec.layers} == {
        (hf.num_key_value_heads, hf.head_dim, torch.float32)
    }


def test_bind_kv_cache_rejects_a_missing_layer_and_a_wrong_layout(built):
    spec = built.model.get_kv_spec()
    good = {s.name: [torch.zeros(8, s.num_kv_heads, BLOCK_SIZE, s.head_size) for _ in range(2)] for s in spec.layers}
    missing = dict(good)
    missing.pop(spec.layers[-1].name)
    with pytest.raises(ValueError, match="no cache for 'layers.1.self_attn'"):
        built.model.bind_kv_cache(missing)
    nhd = {name: [t.transpose(1, 2).contiguous() for t in pair] for name, pair in good.items()}  # [NB, BS, Hk, D]
    with pytest.raises(ValueError, match="HND paged layout"):
        built.model.bind_kv_cache(nhd)
    built.model.bind_kv_cache(good)


def test_forward_before_bind_kv_cache_raises(built):
    with pytest.raises(RuntimeError, match="before bind_kv_cache"):
        built.model(torch.zeros(4, dtype=torch.int64), torch.arange(4), {}, torch.tensor([3]))


def test_speculative_decoding_is_rejected(built):
    built.initialize_kv_cache()
    with pytest.raises(NotImplementedError, match="speculative decoding"):
        built.model(torch.zeros(4, dtype=torch.int64), torch.arange(4), {}, torch.tensor([3]), None, object())


def test_a_block_size_other_than_the_caches_is_rejected(built):
    built.initialize_kv_cache()
    meta = built._metadata([built._table_row(None)], [-1] * 4, 4, cached=0, segment=0)
    for entry in meta.values():
        entry["block_size"] = 2 * BLOCK_SIZE
    with pytest.raises(ValueError, match=f"block_size={2 * BLOCK_SIZE}; the bound cache has {BLOCK_SIZE}"):
        built.model(torch.zeros(4, dtype=torch.int64), torch.arange(4), meta, torch.tensor([3]))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("ep_degree", 2, "ep_degree=2"),
        ("attention_dp_size", 2, "attention_dp_size=2"),
        ("mlp_dp_size", 4, "mlp_dp_size=4"),
        ("quantization", "mxfp4", "quantization='mxfp4'"),
        ("fp8_packed_kv", True, "fp8_packed_kv=True"),
    ],
)
def test_from_configs_rejects_unsupported_neuron_config(field, value, message, fake_sdk, tiny_model_dir, monkeypatch):
    from vllm.config import set_current_vllm_config
    from vllm_neuron.model.neuron_config import NeuronConfig

    from vllm_nki_moe.models.neuron_runner.model import NeuronQwen3MoeForCausalLM

    monkeypatch.setenv("VLLM_NKI_MOE_KERNELS", "torch")
    vllm_config = _vllm_config(tiny_model_dir)
    with set_current_vllm_config(vllm_config), pytest.raises(NotImplementedError, match=message):
        NeuronQwen3MoeForCausalLM.from_configs(vllm_config.model_config.hf_config, NeuronConfig(**{field: value}))


def test_from_configs_rejects_a_vision_config_and_a_missing_vllm_config(fake_sdk, tiny_model_dir):
    from vllm_nki_moe.models.neuron_runner.model import NeuronQwen3MoeForCausalLM

    hf_config = SimpleNamespace()
    with pytest.raises(NotImplementedError, match="vision_neuron_config"):
        NeuronQwen3MoeForCausalLM.from_configs(hf_config, vision_neuron_config=object())
    with pytest.raises(RuntimeError, match="set_current_vllm_config"):
        NeuronQwen3MoeForCausalLM.from_configs(hf_config, None)


def test_on_device_sampling_greedy_rows_take_the_argmax_and_others_stay_in_top_k():
    from vllm_nki_moe.models.neuron_runner.model import sample

    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = torch.tensor([[-1, 1.0, 0.0], [1, 1.0, 0.8], [3, 1.0, 1.0], [-1, 0.5, 1.0]])
    top3 = logits[2].topk(3).indices.tolist()
    for _ in range(20):
        ids = sample(logits, params)
        assert ids.dtype == torch.int32
        assert ids[:2].tolist() == logits[:2].argmax(-1).tolist()  # temperature 0; top_k 1
        assert ids[2].item() in top3
    assert sample(logits, None).tolist() == logits.argmax(-1).tolist()
    # top_p keeps the smallest prefix reaching p: a row with one dominant token always draws it
    peaked = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    assert all(sample(peaked, torch.tensor([[-1, 0.9, 1.0]])).item() == 0 for _ in range(20))


# ---------------------------------------------------------------------------------------------------------------------
# The CPU serving path


def test_the_cpu_model_path_never_imports_the_runner_adapter(tiny_model_dir):
    """Our vLLM-style model built and run as on CPU (the generate harness: vLLM's layers and config, our ops):
    neither the runner adapter nor anything of vllm_neuron is imported."""
    code = (
        "import sys\n"
        "from vllm_nki_moe.tools import generate\n"
        "print(generate.Harness(sys.argv[1], 'torch').generate('A', 2).tokens)\n"
        "neuron_path = ('vllm_nki_moe.models.neuron_runner', 'vllm_neuron')\n"
        "print(sorted(m for m in sys.modules if m.startswith(neuron_path)))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_NKI_MOE", "VLLM_NEURON"))}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_on_device_sampling_applies_logit_mask_and_returns_logits_when_logprobs_are_asked(
    fake_sdk, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("VLLM_NKI_MOE_KERNELS", "torch")
    runner = FakeNeuronModelRunner(_vllm_config(tiny_model_dir), {**ODS_GREEDY, "max_logprobs": 1})
    runner.load_model()
    runner.initialize_kv_cache()
    prompt = _prompt_ids(tiny_model_dir)[0]
    slots = runner._slots(0, list(range(len(prompt))))
    meta = runner._metadata([runner._table_row(0)], slots, len(prompt), cached=0, segment=0)
    vocab = runner.vllm_config.model_config.get_vocab_size()
    allowed = 7
    mask = torch.zeros(1, vocab, dtype=torch.bool)
    mask[0, allowed] = True
    ids = torch.tensor(prompt)
    positions = torch.arange(len(prompt), dtype=torch.int32)
    sampled, logits = runner.model(ids, positions, meta, torch.tensor([len(prompt) - 1]), None, None, mask)
    assert sampled.tolist() == [allowed]
    assert logits.shape == (1, vocab) and torch.isinf(logits[0, :allowed]).all()
