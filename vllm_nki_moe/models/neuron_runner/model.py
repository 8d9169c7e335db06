"""The runner-facing models: our vLLM-style classes (Qwen3-MoE, Qwen3, Llama) with attention on vllm-neuron's
runner-owned paged KV cache.

The contract (``aws-neuron/aws-neuron-sdk:vllm-neuron/docs/model-dev/onboarding-models.md``, "Understanding the
runner → model interface", "Top-level model class", "KV cache lifecycle"; as called by
``jinhuang12/vllm-neuron:vllm_neuron/vllm/worker/neuron_model_runner.py``):

- ``get_kv_spec() -> vllm_neuron.model.kv_cache.KVSpec(layers=[LayerSpec(name, num_kv_heads, head_size, dtype)])``,
  one ``LayerSpec`` per layer named ``layers.{i}.self_attn`` with the per-rank KV heads;
- ``bind_kv_cache(kv_caches: dict[name, [k_cache, v_cache]])``, each ``[num_blocks, num_kv_heads, block_size,
  head_size]`` (HND), allocated by the runner; the model writes them (padding slots: upstream's null-block slots,
  written and never read since no block table lists block 0, or ``-1``, skipped);
- ``load_weights(checkpoint_path, device, cache_dir)``;
- ``forward(input_ids, positions, attn_metadata, sampling_positions, sampling_params, spec_decode_metadata,
  logit_mask, rank, inputs_embeds, is_token_ids)`` -> logits ``[R, vocab]``, or ``(sampled_ids [R], logits | None)``
  with on-device sampling.

Nothing of the model is duplicated: :class:`NeuronRunnerMixin` holds the contract, and each runner class is the mixin
over one of our vLLM-style classes (``models.qwen3_moe.Qwen3MoeForCausalLM``, ``models.dense.Qwen3ForCausalLM`` /
``LlamaForCausalLM``: same embedding, decoder layers, norms, router, experts and dense MLP through
``vllm_nki_moe.ops``, same checkpoint table). The mixin only swaps each layer's vLLM ``Attention`` for
:class:`~vllm_nki_moe.models.paged_attention.PagedAttention` (through the
model's ``attn_factory`` seam), which calls ``ops.attention_prefill`` / ``ops.attention_decode`` on the bound caches.
The runner's per-step metadata becomes the cache's ``step`` (see :meth:`NeuronRunnerMixin.describe_step`).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import torch
from torch import nn

from vllm_nki_moe.models.dense import LlamaForCausalLM, Qwen3ForCausalLM
from vllm_nki_moe.models.neuron_runner import factory, rank_embedding
from vllm_nki_moe.models.neuron_runner.config import WHERE, NeuronRunnerConfig
from vllm_nki_moe.models.paged_attention import PagedAttention
from vllm_nki_moe.models.qwen3_moe import Qwen3MoeAttention, Qwen3MoeForCausalLM
from vllm_nki_moe.ops.rope import rope_cos_sin_cache

LAYER_NAME = "layers.{}.self_attn"  # upstream's convention: KVSpec layer names = attn_metadata keys
SAMPLING_EPS = 1e-5  # temperatures below this sample greedily (vLLM's sampler uses the same epsilon)


class RunnerKVCache:
    """The runner-owned caches (``bind_kv_cache``) and the current step, as ``PagedAttention`` reads them."""

    def __init__(self, num_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.step: dict = {}


class NeuronRunnerMixin:
    """vllm-neuron's runner contract (module docstring) over one of our model classes, placed after this mixin in the
    bases; built by ``factory.from_configs``."""

    def __init__(self, *, vllm_config, config: NeuronRunnerConfig) -> None:
        kv = RunnerKVCache(config.sizes.num_hidden_layers)

        def paged_attention(attention: Qwen3MoeAttention, layer_idx: int) -> PagedAttention:
            return PagedAttention(kv, layer_idx, attention.head_dim**-0.5, self.opset)  # opset is bound by now

        super().__init__(vllm_config=vllm_config, attn_factory=paged_attention)
        self.kv = kv
        self.config = config
        self.vllm_config = vllm_config

    @classmethod
    def from_configs(cls, hf_config, neuron_config=None, **kwargs):
        """How vllm-neuron's runner builds models (``NeuronModelRunner.load_model``): see ``factory.from_configs``."""
        return factory.from_configs(cls, hf_config, neuron_config, **kwargs)

    @property
    def where(self) -> str:
        return WHERE.format(self.architecture)

    # ----------------------------------------------------------------------------------------------------------------
    # KV cache

    def get_kv_spec(self):
        """``KVSpec`` with one ``LayerSpec`` per layer: per-rank KV heads, head_dim, the model dtype."""
        from vllm_neuron.model.kv_cache import KVSpec, LayerSpec

        layers = []
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            layers.append(
                LayerSpec(
                    name=LAYER_NAME.format(i),
                    num_kv_heads=attn.num_kv_heads,
                    head_size=attn.head_dim,
                    dtype=self.config.dtype,
                )
            )
        return KVSpec(layers=layers)

    def bind_kv_cache(self, kv_caches: dict[str, list[torch.Tensor]]) -> None:
        """Keep the runner's ``[k_cache, v_cache]`` per layer (``[NB, Hk, BS, D]``, the attention ops' layout)."""
        for i, layer in enumerate(self.model.layers):
            name = LAYER_NAME.format(i)
            if name not in kv_caches:
                raise ValueError(f"{self.where}: bind_kv_cache has no cache for {name!r}; get_kv_spec declared it")
            k_cache, v_cache = kv_caches[name][0], kv_caches[name][1]
            attn = layer.self_attn
            want = (attn.num_kv_heads, attn.head_dim)
            for what, cache in (("k", k_cache), ("v", v_cache)):
                if cache.dim() != 4 or (cache.shape[1], cache.shape[3]) != want or cache.dtype != self.config.dtype:
                    raise ValueError(
                        f"{self.where}: {name} {what}_cache shape={tuple(cache.shape)} dtype={cache.dtype}; must be "
                        f"[num_blocks, {want[0]}, block_size, {want[1]}] {self.config.dtype} (HND paged layout)"
                    )
            if v_cache.shape != k_cache.shape:
                raise ValueError(f"{self.where}: {name} v_cache{tuple(v_cache.shape)} != k_cache{tuple(k_cache.shape)}")
            self.kv.k[i], self.kv.v[i] = k_cache, v_cache

    # ----------------------------------------------------------------------------------------------------------------
    # Weights

    def load_weights(self, checkpoint_path: str, device=None, cache_dir: str | None = None) -> set[str]:
        """The runner's ``load_weights(model_path, device, download_dir)``: this rank's shards from the safetensors.

        Parameters created on ``meta`` (the runner builds the model under ``torch.device("meta")``) are materialised
        on the CPU first and the RoPE table recomputed; the checkpoint is then read one tensor at a time through the
        CPU model's own table (``Qwen3MoeForCausalLM.load_weights``: q/k/v and gate/up fusions, experts stacked, TP
        shards cut by vLLM's weight loaders), and vLLM's ``process_weights_after_loading`` runs as its loader would.
        ``device`` is where the runner moves the model afterwards (``model.to(device)``); loading happens on the CPU.
        Returns the parameter names filled; a parameter the checkpoint lacks is a ``ValueError``.
        """
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.utils import process_weights_after_loading

        model_dir = _checkpoint_dir(checkpoint_path, cache_dir)
        self._materialize()
        with set_current_vllm_config(self.vllm_config):
            loaded = super().load_weights(_safetensors_weights(model_dir, self.where))
            missing = sorted({name for name, _ in self.named_parameters()} - loaded)
            if missing:
                raise ValueError(
                    f"{self.where}: checkpoint {model_dir} lacks {len(missing)} tensors, e.g. {missing[:3]}"
                )
            process_weights_after_loading(self, self.vllm_config.model_config, torch.device("cpu"))
        return loaded

    def _materialize(self) -> None:
        """Meta tensors become uninitialised CPU tensors, keeping what ``Module.to_empty`` would lose: a parameter's
        identity across modules (tied embeddings) and its attributes (vLLM's ``weight_loader``, ``output_dim``...)."""
        fresh: dict[int, nn.Parameter] = {}
        for module in self.modules():
            for name, param in list(module._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                if id(param) not in fresh:
                    # Same class (vLLM's BasevLLMParameter subclasses keep their loaders in the instance dict), new
                    # data; __new__ alone, as __init__ would re-derive what the dict already holds.
                    cls = type(param)
                    new = cls.__new__(cls, torch.empty_like(param, device="cpu"))
                    new.requires_grad_(param.requires_grad)
                    new.__dict__.update(param.__dict__)
                    fresh[id(param)] = new
                module._parameters[name] = fresh[id(param)]
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.is_meta:
                    module._buffers[name] = torch.empty_like(buffer, device="cpu")
        sizes = self.config.sizes
        for module in self.modules():
            if isinstance(module, Qwen3MoeAttention):  # a derived buffer, never in the checkpoint
                module.cos_sin_cache = rope_cos_sin_cache(
                    module.head_dim, sizes.max_position_embeddings, sizes.rope_theta, sizes.rope_llama3
                ).to(module.cos_sin_cache.device)

    # ----------------------------------------------------------------------------------------------------------------
    # Forward

    def describe_step(self, meta: dict, positions: torch.Tensor) -> dict:
        """The runner's metadata for one layer group as ``PagedAttention``'s step (``paged_attention`` module).

        ``meta``: ``block_table_tensor [R, MB]`` int32 (unused rows/entries are the null block, or ``-1`` once
        upstream remaps it for its kernels), ``slot_mapping [T]`` (padding: null-block slots or ``-1``), ``block_size``,
        ``decode_token_threshold``, ``kv_segment_size`` (0 or absent = whole-prompt prefill).

        The phase comes from the bucket's shapes, never from a request: T tokens over R block-table rows.
        - decode (``T / R <= decode_token_threshold``): the T tokens are R requests x T/R tokens each; each token is
          a row of ``ops.attention_decode`` with its request's blocks and context ``position + 1``.
        - whole-prompt prefill (one row, ``T > decode_token_threshold``, no segment): one request from position 0
          (padding after it), ``ops.attention_prefill``.
        - segmented prefill (``kv_segment_size > 0``: a chunk after ``cached_seq_len`` cached tokens, or a prefix-cache
          hit): one request; each token is a decode row over the cache, which holds the earlier chunks and, once
          written, this chunk's earlier tokens.
        Upstream's models branch on ``max_query_len <= decode_token_threshold`` (the request's longest query); under
        ``torch.compile`` that Python int is guarded by value, so two prompt lengths in one prefill bucket would
        compile twice, which the runner's ``fail_on_recompile`` stance refuses after warm-up. Both rules agree on
        every step the runner builds (a decode bucket has one row per request; a prefill step one row), and the
        decode form is exact for any step (it only attends over what the cache holds), so shapes decide.
        Block-table entries below 0 are read as block 0: the decode kernel needs valid indices, and such entries
        are only reached by padding rows or masked positions.
        """
        slot_mapping = meta["slot_mapping"]
        num_tokens = slot_mapping.shape[0]
        block_size = int(meta["block_size"])
        cache_block_size = self.kv.k[0].shape[2]
        if block_size != cache_block_size:
            raise ValueError(
                f"{self.where}: attn_metadata block_size={block_size}; the bound cache has {cache_block_size}"
            )
        table = meta["block_table_tensor"]
        requests = table.shape[0]
        is_decode = num_tokens // requests <= meta["decode_token_threshold"]
        segmented = bool(meta.get("kv_segment_size") or 0)
        if not is_decode and not segmented and requests == 1:
            return {"phase": "prefill", "slot_mapping": slot_mapping}
        if not is_decode and requests != 1:
            raise NotImplementedError(
                f"{self.where}: a prefill step of {num_tokens} tokens over block_table_tensor rows={requests}; "
                "one request per prefill step"
            )
        if num_tokens % requests:
            raise ValueError(f"{self.where}: {num_tokens} tokens for {requests} block-table rows; must be a multiple")
        table = torch.where(table < 0, torch.zeros_like(table), table)
        max_context = table.shape[1] * block_size
        return {
            "phase": "decode",
            "slot_mapping": slot_mapping,
            "block_tables": table.repeat_interleave(num_tokens // requests, dim=0),
            "context_lens": (positions.long() + 1).clamp(1, max_context),
        }

    def _embed(self, input_ids: torch.Tensor, rank: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings; under tensor parallelism from the ``rank`` tensor (one graph for every rank)."""
        embedding = self.model.embed_tokens
        if embedding.tp_size == 1:
            return self.model.embed_input_ids(input_ids)
        if rank is None:
            raise ValueError(f"{self.where}: forward without rank at tensor_parallel_size={embedding.tp_size}")
        from vllm.distributed import get_tensor_model_parallel_rank, tensor_model_parallel_all_reduce

        per_rank = rank_embedding.rows_per_rank(embedding, get_tensor_model_parallel_rank())
        vocab = embedding.org_vocab_size
        return tensor_model_parallel_all_reduce(
            rank_embedding.rank_embedding(input_ids, embedding.weight, rank, per_rank, vocab)
        )

    @torch.no_grad()
    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,  # [T] token ids, padded to the bucket
        positions: torch.Tensor,  # [T] int32 positions (padding: any value)
        attn_metadata: dict | None = None,  # {"layers.{i}.self_attn": {...}}, see describe_step
        sampling_positions: torch.Tensor | None = None,  # [R] rows of T to produce logits for
        sampling_params: torch.Tensor | None = None,  # [R, 3] (top_k, top_p, temperature); None: CPU sampling
        spec_decode_metadata=None,  # speculative decoding: not supported
        logit_mask: torch.Tensor | None = None,  # [R, vocab] bool, True = allowed (structured outputs)
        rank: torch.Tensor | None = None,  # scalar TP rank: the embedding's vocabulary range (rank_embedding)
        inputs_embeds: torch.Tensor | None = None,  # [T, hidden] (prompt-embeds path)
        is_token_ids: torch.Tensor | None = None,  # [T] bool: True rows take input_ids' embedding
        **kwargs,
    ):
        """Logits ``[R, vocab]``; with on-device sampling ``(sampled_ids [R] int32, logits [R, vocab] | None)``."""
        if spec_decode_metadata is not None:
            raise NotImplementedError(
                f"{self.where}: spec_decode_metadata is set; speculative decoding is not supported"
            )
        if self.kv.k[0] is None:
            raise RuntimeError(f"{self.where}: forward before bind_kv_cache")
        self.kv.step = self.describe_step(attn_metadata[LAYER_NAME.format(0)], positions)
        # Rows past the RoPE table (padding only) would index out of it; real positions are < max_model_len.
        rope_positions = positions.long().clamp(0, self.sizes.max_position_embeddings - 1)
        embeds = self._embed(input_ids, rank)
        if inputs_embeds is not None:
            if is_token_ids is None:
                embeds = inputs_embeds.to(embeds.dtype)
            else:
                embeds = torch.where(is_token_ids[:, None], embeds, inputs_embeds.to(embeds.dtype))
        hidden = self.model(None, rope_positions, embeds)
        if sampling_positions is None:
            sampling_positions = torch.arange(hidden.shape[0], device=hidden.device)
        logits = self.compute_logits(hidden.index_select(0, sampling_positions.long()))
        if not self.config.on_device_sampling:
            return logits
        if logit_mask is not None:
            logits = logits.masked_fill(~logit_mask.bool(), float("-inf"))
        sampled = sample(logits, None if self.config.all_greedy else sampling_params)
        return sampled, (logits if self.config.return_logits else None)


class NeuronQwen3MoeForCausalLM(NeuronRunnerMixin, Qwen3MoeForCausalLM):
    """Qwen3-MoE under vllm-neuron's ``NeuronModelRunner``."""


class NeuronQwen3ForCausalLM(NeuronRunnerMixin, Qwen3ForCausalLM):
    """Qwen3 dense under vllm-neuron's ``NeuronModelRunner``."""


class NeuronLlamaForCausalLM(NeuronRunnerMixin, LlamaForCausalLM):
    """Llama 3.x under vllm-neuron's ``NeuronModelRunner``."""


def sample(logits: torch.Tensor, sampling_params: torch.Tensor | None) -> torch.Tensor:
    """On-device sampling: ``[R, V]`` logits, ``[R, 3]`` (top_k, top_p, temperature) -> ``[R]`` int32 token ids.

    ``None`` params, or a row's temperature below ``SAMPLING_EPS``, is greedy (argmax). Otherwise: logits divided by
    the temperature, the top_k largest kept (``top_k <= 0``: all), then the smallest prefix of them whose probability
    reaches top_p, and one draw by the exponential-race form of Gumbel-max (``argmax p / Exp(1)``), which needs no
    data-dependent shapes. The runner's defaults are (-1, 1.0, 0.0) (``build_sampling_params_tensor``).
    """
    greedy = logits.argmax(dim=-1)
    if sampling_params is None:
        return greedy.to(torch.int32)
    top_k, top_p, temperature = sampling_params.float().unbind(dim=-1)
    is_greedy = temperature < SAMPLING_EPS
    scaled = logits.float() / torch.where(is_greedy, torch.ones_like(temperature), temperature)[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    rank = torch.arange(vocab, device=logits.device)[None, :]
    keep = rank < torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))[:, None]
    probs = torch.softmax(ordered.masked_fill(~keep, float("-inf")), dim=-1)
    keep = keep & ((probs.cumsum(dim=-1) - probs) < top_p[:, None])  # the first token always stays
    probs = torch.softmax(ordered.masked_fill(~keep, float("-inf")), dim=-1)
    # Exponential race without in-place random ops (Exp(1) = -log(1 - U)): graphs the runner compiles are
    # functionalised, and an in-place exponential_ on a fresh buffer is one more mutation to carry.
    noise = -torch.log1p(-torch.rand_like(probs))
    choice = (probs / noise).argmax(dim=-1)
    drawn = order.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(is_greedy, greedy, drawn).to(torch.int32)


def _checkpoint_dir(checkpoint_path: str, cache_dir: str | None) -> str:
    """A local directory as is; otherwise a Hugging Face repo id, fetched (safetensors and JSON only) into cache_dir."""
    if os.path.isdir(checkpoint_path):
        return checkpoint_path
    from huggingface_hub import snapshot_download

    return snapshot_download(checkpoint_path, cache_dir=cache_dir, allow_patterns=["*.safetensors", "*.json"])


def _safetensors_weights(model_dir: str, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every ``*.safetensors`` file, read lazily one at a time."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"{where}: no *.safetensors in {model_dir}")
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
