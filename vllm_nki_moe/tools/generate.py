"""``vllm-nki-moe generate``: greedy generation over our Qwen3-MoE modules with our paged KV cache, no vLLM engine.

The kernel developers' harness (as the contest's ``main.py --mode generate``): it builds ``Qwen3MoeForCausalLM`` from
``vllm_nki_moe.models`` outside vLLM's engine (vLLM's distributed state for one process, the checkpoint's
``VllmConfig``), loads the safetensors through the model's ``load_weights``, and replaces each layer's vLLM
``Attention`` with :class:`PagedAttention`, which keeps that layer's K/V in the layout the Neuron path uses
(``[num_blocks, kv_heads, block_size, head_dim]``, blocks handed out from a shuffled free list so that no sequence's
blocks are contiguous) and calls ``ops.attention_prefill`` / ``ops.attention_decode``. Every op therefore runs
through ``vllm_nki_moe.ops`` under the chosen backend. Prompts run one at a time (batch 1, as the contest scores):
one prefill, then one decode step per new token, greedy, EOS ignored.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_nki_moe import envs, ops
from vllm_nki_moe.models.paged_attention import PagedAttention

DEFAULT_BLOCK_SIZE = 32  # tokens per KV-cache block: the vLLM Neuron plugin's default (research/vllm.md, 1.3)
CACHE_SEED = 0  # seed of the shuffled block free list


class PagedKVCache:
    """Every layer's K/V cache ``[num_blocks, kv_heads, block_size, head_dim]`` and the running sequence's blocks.

    One block table serves all layers (as in vLLM). Blocks come from a seeded shuffled free list and the cache has
    spare blocks, so a sequence's blocks are scattered and out of order. ``step`` describes the current forward pass
    to the layers' :class:`~vllm_nki_moe.models.paged_attention.PagedAttention`.
    """

    def __init__(
        self, num_layers: int, kv_heads: int, head_dim: int, block_size: int, max_tokens: int, dtype: torch.dtype
    ) -> None:
        blocks_per_seq = -(-max_tokens // block_size)
        self.num_blocks = 2 * blocks_per_seq + 1  # spare blocks: a sequence's blocks land anywhere in the cache
        self.block_size = block_size
        self.max_tokens = max_tokens
        shape = (self.num_blocks, kv_heads, block_size, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self._order = torch.randperm(self.num_blocks, generator=torch.Generator().manual_seed(CACHE_SEED)).tolist()
        self.reset()

    def reset(self) -> None:
        """Start a new sequence (its blocks return to the free list)."""
        self.free = list(self._order)
        self.blocks: list[int] = []
        self.length = 0
        self.step: dict = {}

    def append(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Room for ``num_tokens`` more tokens; returns their positions and slots, and sets ``step``."""
        if self.length + num_tokens > self.max_tokens:
            raise ValueError(
                f"generate: sequence length={self.length + num_tokens}; exceeds the cache's {self.max_tokens} tokens"
            )
        positions = torch.arange(self.length, self.length + num_tokens)
        while len(self.blocks) * self.block_size < self.length + num_tokens:
            self.blocks.append(self.free.pop())
        table = torch.tensor(self.blocks, dtype=torch.int64)
        slots = table[positions // self.block_size] * self.block_size + positions % self.block_size
        self.step = {
            "phase": "prefill" if self.length == 0 else "decode",
            "slot_mapping": slots,
            "block_tables": table[None, :],
            "context_lens": torch.tensor([self.length + num_tokens]),
        }
        self.length += num_tokens
        return positions, slots


@dataclass
class Generation:
    prompt: str
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    prefill_seconds: float
    decode_seconds: float
    # --compile: per shape bucket (phase, tokens, block-table width), (graphs, graph breaks) of the traced forward
    graphs: dict[tuple, tuple[int, int]] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / max(self.prefill_seconds + self.decode_seconds, 1e-9)


@contextlib.contextmanager
def _kernels_env(kernels: str):
    """The model binds its ops from ``VLLM_NKI_MOE_KERNELS`` at construction; set it for the build only."""
    old = os.environ.get(envs.KERNELS_ENV)
    os.environ[envs.KERNELS_ENV] = kernels
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(envs.KERNELS_ENV, None)
        else:
            os.environ[envs.KERNELS_ENV] = old


def _init_distributed() -> None:
    """vLLM's tensor/pipeline-parallel groups for one process (gloo), once per process."""
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if not torch.distributed.is_initialized():
        init_method = f"file://{tempfile.mkdtemp(prefix='vllm-nki-moe-generate-')}/dist"
        init_distributed_environment(
            world_size=1, rank=0, distributed_init_method=init_method, local_rank=0, backend="gloo"
        )
    if not model_parallel_is_initialized():
        initialize_model_parallel(1, 1)


class Harness:
    """A loaded model with paged attention, ready to generate; built once per (model, kernels, block size)."""

    def __init__(
        self,
        model_dir: str | Path,
        kernels: str,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_tokens: int = 512,
        compile: bool = False,
    ) -> None:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer
        from vllm.config import set_current_vllm_config
        from vllm.engine.arg_utils import EngineArgs
        from vllm.model_executor.model_loader.utils import process_weights_after_loading

        from vllm_nki_moe.plugin import model_class

        self.model_dir = str(model_dir)
        self.opset = ops.bind(kernels)  # explicit, hence strict: a kernel that cannot take the shapes raises
        self.vllm_config = EngineArgs(
            model=self.model_dir, dtype="float32", enforce_eager=True, max_model_len=max_tokens
        ).create_engine_config()
        with set_current_vllm_config(self.vllm_config), _kernels_env(kernels):
            _init_distributed()
            architecture = (self.vllm_config.model_config.hf_config.architectures or ["Qwen3MoeForCausalLM"])[0]
            self.model = model_class(architecture)(vllm_config=self.vllm_config).eval()
        weights: dict[str, torch.Tensor] = {}
        for path in sorted(glob.glob(os.path.join(self.model_dir, "*.safetensors"))):
            weights.update(load_file(path))
        with set_current_vllm_config(self.vllm_config):
            loaded = self.model.load_weights(weights.items())
            # as vLLM's DefaultModelLoader.load_weights: every parameter must come from the checkpoint
            missing = sorted({name for name, _ in self.model.named_parameters()} - loaded)
            if missing:
                raise ValueError(
                    f"generate: checkpoint {self.model_dir} lacks {len(missing)} tensors, e.g. {missing[:3]}"
                )
            # what vLLM's loader does next: layers repack their weights for the platform (CPU GEMM handles here)
            process_weights_after_loading(self.model, self.vllm_config.model_config, torch.device("cpu"))
        layers = self.model.model.layers
        first = layers[0].self_attn
        self.cache = PagedKVCache(
            len(layers), first.num_kv_heads, first.head_dim, block_size, max_tokens, dtype=torch.float32
        )
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            layer.self_attn.attn = PagedAttention(self.cache, i, attn.head_dim**-0.5, self.opset)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        # --compile: every step through torch.compile(fullgraph=True), as vLLM Neuron's runner compiles each bucket;
        # aot_eager traces through AOTAutograd (functionalisation of the cache writes included) without codegen. The
        # backend counts the graphs it is handed; fullgraph turns any graph break into an error, counted as one.
        self.graphs: dict[tuple, tuple[int, int]] = {}
        self._graphs_traced = 0
        if compile:
            # Collect what earlier models left in reference cycles now: vLLM's CPU GEMM handles call `.item()` in
            # their destructors, which must not run inside a trace (fake tensors) if the collector fires there.
            gc.collect()
        self.compiled = (
            torch.compile(self.model, fullgraph=True, backend=self._counting_backend, dynamic=False)
            if compile
            else None
        )

    def _counting_backend(self, graph_module, example_inputs):
        self._graphs_traced += 1
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.model(input_ids, positions)
        step = self.cache.step
        bucket = (step["phase"], input_ids.shape[0], step["block_tables"].shape[1])
        if self.graphs.get(bucket, (0, 0))[1]:  # this bucket broke: reported (exit status 1), generation goes on
            return self.model(input_ids, positions)
        before = self._graphs_traced
        try:
            hidden = self.compiled(input_ids, positions)
        except torch._dynamo.exc.Unsupported:
            # nothing ran: Dynamo stops at the break before the graph executes, so eager runs this step once
            self.graphs[bucket] = (self._graphs_traced - before, 1)
            return self.model(input_ids, positions)
        graphs, breaks = self.graphs.get(bucket, (0, 0))
        self.graphs[bucket] = (graphs + self._graphs_traced - before, breaks)
        return hidden

    def _next_token(self, input_ids: torch.Tensor) -> int:
        positions, _ = self.cache.append(input_ids.shape[0])
        hidden = self._forward(input_ids, positions)
        logits = self.model.compute_logits(hidden[-1:])
        return int(logits[0].argmax())

    @torch.inference_mode()
    def generate(self, prompt: str, max_new_tokens: int) -> Generation:
        from vllm.config import set_current_vllm_config

        prompt_ids = self.tokenizer(prompt).input_ids
        self.cache.reset()
        tokens: list[int] = []
        with set_current_vllm_config(self.vllm_config):
            start = time.perf_counter()
            tokens.append(self._next_token(torch.tensor(prompt_ids)))
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            while len(tokens) < max_new_tokens:
                tokens.append(self._next_token(torch.tensor(tokens[-1:])))
            decode = time.perf_counter() - start
        text = self.tokenizer.decode(tokens)
        return Generation(prompt, prompt_ids, tokens, text, prefill, decode, dict(self.graphs))


def hf_greedy(
    model_dir: str | Path, prompts: list[str], max_new_tokens: int, dtype: str = "float32"
) -> list[list[int]]:
    """Hugging Face ``generate`` on the host CPU: greedy, EOS ignored (as vLLM's ``ignore_eos``), in ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.generation_config.eos_token_id = None
    results = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=0,
                attention_mask=torch.ones_like(ids),
            )
        results.append(out[0, ids.shape[1] :].tolist())
    return results


def first_mismatch(ours: list[int], reference: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length), None when equal."""
    for i, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            return i
    return None if len(ours) == len(reference) else min(len(ours), len(reference))


def run_generate(args) -> int:
    """The ``generate`` subcommand; exit status 1 when ``--compare-hf`` finds a mismatch."""
    prompts = args.prompt or ["Hello world, the quick brown fox"]
    try:
        harness = Harness(
            args.model, args.kernels, block_size=args.block_size, max_tokens=args.max_model_len, compile=args.compile
        )
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}")
        return 2
    results = [harness.generate(p, args.max_new_tokens) for p in prompts]
    print(f"kernels: {harness.opset.describe()}; KV cache {harness.cache.num_blocks} blocks of {args.block_size}")
    for i, r in enumerate(results):
        print(
            f"[{i}] {r.prompt!r}: {len(r.prompt_tokens)} prompt + {len(r.tokens)} new tokens, prefill "
            f"{r.prefill_seconds:.3f} s, decode {r.decode_seconds:.3f} s, {r.tokens_per_second:.2f} tokens/s"
        )
        print(f"    text: {r.text!r}")
        print(f"    tokens: {r.tokens}")
    status = 0
    if args.compile:
        for (phase, tokens, width), (graphs, breaks) in sorted(harness.graphs.items()):
            print(f"compile: {phase} T={tokens} block-table width {width}: {graphs} graph(s), {breaks} graph break(s)")
            if graphs != 1 or breaks:
                status = 1
    if not args.compare_hf:
        return status
    expected = hf_greedy(args.model, prompts, args.max_new_tokens)
    for i, (r, ref) in enumerate(zip(results, expected)):
        at = first_mismatch(r.tokens, ref)
        if at is None:
            print(f"[{i}] Hugging Face: match ({len(ref)} tokens)")
        else:
            status = 1
            got = r.tokens[at] if at < len(r.tokens) else None
            want = ref[at] if at < len(ref) else None
            print(f"[{i}] Hugging Face: MISMATCH at new token {at}: ours {got}, Hugging Face {want}")
    return status


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, tokenizer)")
    parser.add_argument("--kernels", choices=("emulator", "torch", "nki"), default="emulator", help="op backend")
    parser.add_argument("--prompt", action="append", help="prompt text (repeat for several; run one at a time)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (EOS ignored)")
    parser.add_argument("--compare-hf", action="store_true", help="check against Hugging Face greedy generate")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run every step through torch.compile(fullgraph=True, backend=aot_eager); print graphs and graph breaks "
        "per shape bucket; exit status 1 on any break",
    )
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="KV-cache block size (tokens)")
    parser.add_argument("--max-model-len", type=int, default=512, help="prompt + new tokens, at most")
