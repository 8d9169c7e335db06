"""Qwen3-MoE for vLLM with every norm, RoPE, router and expert op going through ``vllm_nki_moe.ops``.

Classes follow vLLM's ``qwen3_moe.py`` in forward order and naming. vLLM's own parallel linears, embedding, LM head
and ``Attention`` (the paged KV cache and its backend) are reused; the ops this project writes NKI kernels for
(RMSNorm, fused residual-add + RMSNorm, q/k norm, RoPE, router top-k, experts) are bound once per model by
``ops.bind()`` and called without knowing the backend. Parameter names are checkpoint names, except the fusions
listed in ``weight_map``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from vllm_nki_moe import envs, ops
from vllm_nki_moe.models import weight_map
from vllm_nki_moe.models.config import Qwen3MoeSizes, read_sizes
from vllm_nki_moe.models.paged_attention import PagedAttention
from vllm_nki_moe.ops.rope import rope_cos_sin_cache

logger = logging.getLogger(__name__)

# Builds a layer's attention module in place of vLLM's ``Attention``: ``factory(attention, layer_idx) -> module`` with
# ``module(q [T, Hq*D], k, v [T, Hk*D]) -> [T, Hq*D]``; ``attention`` is the Qwen3MoeAttention being built (its head
# counts and head_dim are set). The Neuron runner adapter (``models/neuron_runner/``) uses it for the runner-owned
# paged cache.
AttentionFactory = Callable[["Qwen3MoeAttention", int], nn.Module]


class Qwen3MoeRMSNorm(nn.Module):
    """RMSNorm over the last axis, optionally fused with the residual add (``forward(x, residual)``)."""

    def __init__(self, size: int, eps: float, opset: ops.OpSet) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = opset

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class Qwen3MoeMLP(nn.Module):
    """Dense SwiGLU MLP, for the layers listed in ``mlp_only_layers`` or off ``decoder_sparse_step``."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        opset: ops.OpSet,
        prefix: str = "",
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=False, quant_config=quant_config, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=False, quant_config=quant_config, prefix=f"{prefix}.down_proj"
        )
        self.ops = opset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.ops.silu_mul(gate_up))
        return out


class Qwen3MoeExperts(nn.Module):
    """The routed experts of one layer, stacked: ``w13 [E, 2*I_tp, H]`` (gate rows, then up rows), ``w2 [E, H, I_tp]``.

    Tensor parallelism splits the intermediate size I across ranks (I_tp = I / tp); each rank's partial sums are
    all-reduced by the caller. With ``fp8`` the weights are ``float8_e4m3fn`` as in the checkpoint, with their fp32
    block scales expanded along I (``ops.fp8``): ``w13_weight_scale_inv [E, 2*I_tp, ceil(H/128)]`` (a scale row per
    weight row) and ``w2_weight_scale_inv [E, ceil(H/128), I_tp]`` (a scale column per weight column), so a rank's
    rows need not start on a block boundary.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, fp8: bool = False) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        self.intermediate_per_rank = inter = intermediate_size // tp_size
        self.fp8 = fp8
        dtype = ops.fp8.FP8_DTYPE if fp8 else None
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size, dtype=dtype), False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, inter, dtype=dtype), False)
        if fp8:
            blocks = ops.fp8.blocks(hidden_size)
            scales = dict(dtype=torch.float32)  # fp32 whatever the model dtype, as in the checkpoint
            self.w13_weight_scale_inv = nn.Parameter(torch.empty(num_experts, 2 * inter, blocks, **scales), False)
            self.w2_weight_scale_inv = nn.Parameter(torch.empty(num_experts, blocks, inter, **scales), False)

    def load_expert_weight(self, param_name: str, expert: int, shard: int | None, loaded: torch.Tensor) -> None:
        """Copy one checkpoint tensor (``gate_proj``/``up_proj`` ``[I, H]`` or ``down_proj`` ``[H, I]``) into place."""
        if ops.moe.layout_of(self.w13_weight) != ops.moe.MODEL_LAYOUT:
            raise RuntimeError(
                f"Qwen3MoeExperts: {param_name} of expert {expert} arrives after the experts were converted to the "
                f"{ops.moe.layout_of(self.w13_weight)} layout; load every checkpoint tensor before the conversion"
            )
        rows = self.intermediate_per_rank
        start = self.tp_rank * rows
        if param_name == "w13_weight_scale_inv":  # this rank's rows of a scale row per weight row
            loaded, start = ops.fp8.expand_rows(loaded, start, rows), 0
        elif param_name == "w2_weight_scale_inv":  # this rank's columns of a scale column per weight column
            loaded, start = ops.fp8.expand_cols(loaded, start, rows), 0
        target = getattr(self, param_name).data[expert]
        if param_name.startswith("w13"):
            target[shard * rows : (shard + 1) * rows].copy_(loaded[start : start + rows])
        else:
            target.copy_(loaded[:, start : start + rows])
        # Copies through .data leave the version counter alone; bump it so caches of derived layouts (ops.host
        # prepacked experts) see a reload.
        torch.autograd.graph.increment_version(getattr(self, param_name))


class Qwen3MoeRouterGate(nn.Module):
    """Holds the router weight ``[E, H]`` under its checkpoint name (``mlp.gate.weight``), replicated on every rank."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)


class Qwen3MoeSparseMoeBlock(nn.Module):
    """Router (``gate``: logits -> softmax -> top-k -> optional renormalisation) and the routed experts.

    Called with the decoder layer's residual and post-attention norm, so that the whole MoE half of the layer is one
    op (``moe_block``): a backend with a fused kernel for it (norm + router + experts, the contest winner's design)
    runs that kernel, the others run the ops in sequence.
    """

    def __init__(self, sizes: Qwen3MoeSizes, opset: ops.OpSet, prefix: str = "") -> None:
        super().__init__()
        self.top_k = sizes.num_experts_per_tok
        self.norm_topk_prob = sizes.norm_topk_prob
        self.tp_size = get_tensor_model_parallel_world_size()
        # The router weight [E, H] as a plain parameter: the ops read it directly (vLLM's CPU linear layers repack
        # their weight for oneDNN and leave the parameter empty).
        self.gate = Qwen3MoeRouterGate(sizes.hidden_size, sizes.num_experts)
        self.experts = Qwen3MoeExperts(sizes.num_experts, sizes.hidden_size, sizes.moe_intermediate_size, sizes.fp8)
        self.ops = opset

    def forward(
        self, hidden_states: torch.Tensor, residual: torch.Tensor, norm: Qwen3MoeRMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        experts, args = self.experts, (hidden_states, residual, norm.weight, norm.eps, self.gate.weight)
        if experts.fp8:
            scaled = (experts.w13_weight, experts.w13_weight_scale_inv, experts.w2_weight, experts.w2_weight_scale_inv)
            out, residual = self.ops.moe_block_fp8(*args, *scaled, self.top_k, self.norm_topk_prob)
        else:
            out, residual = self.ops.moe_block(
                *args, experts.w13_weight, experts.w2_weight, self.top_k, self.norm_topk_prob
            )
        if self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out, residual


class Qwen3MoeAttention(nn.Module):
    """GQA attention with per-head q/k RMSNorm (Qwen3; not Llama) before neox RoPE; the KV cache and kernel are
    vLLM's ``Attention``."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        sizes: Qwen3MoeSizes,
        opset: ops.OpSet,
        prefix: str = "",
        *,
        layer_idx: int = 0,
        attn_factory: AttentionFactory | None = None,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.head_dim = sizes.head_dim
        self.num_heads = sizes.num_attention_heads // tp_size
        # Fewer kv heads than ranks: each rank keeps a replica (vLLM's QKVParallelLinear does the same).
        self.num_kv_heads = max(1, sizes.num_key_value_heads // tp_size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            sizes.hidden_size,
            self.head_dim,
            sizes.num_attention_heads,
            sizes.num_key_value_heads,
            bias=sizes.attention_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            sizes.num_attention_heads * self.head_dim,
            sizes.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.qk_norm = sizes.qk_norm
        if self.qk_norm:
            self.q_norm = Qwen3MoeRMSNorm(self.head_dim, sizes.rms_norm_eps, opset)
            self.k_norm = Qwen3MoeRMSNorm(self.head_dim, sizes.rms_norm_eps, opset)
        # A buffer, not a parameter: derived from the config, never loaded from the checkpoint.
        self.register_buffer(
            "cos_sin_cache",
            rope_cos_sin_cache(self.head_dim, sizes.max_position_embeddings, sizes.rope_theta, sizes.rope_llama3),
            persistent=False,
        )
        if attn_factory is not None:
            self.attn = attn_factory(self, layer_idx)
        else:
            self.attn = Attention(
                self.num_heads,
                self.head_dim,
                self.head_dim**-0.5,
                num_kv_heads=self.num_kv_heads,
                cache_config=vllm_config.cache_config,
                prefix=f"{prefix}.attn",
            )
        self.ops = opset
        # q/k norm and no bias: a decode step on our paged cache can be one op (decode_block), per weight format
        self.block_fp8 = quant_config is not None
        self.block_applies = self.qk_norm and not sizes.attention_bias
        self.tp_size = tp_size

    def fuses_fp8_decode(self) -> bool:
        """Whether this attention runs as the fused FP8 attention half in decode steps (``decode_block``; decoder
        layers in one op, ``Qwen3MoeModel.decode_layers``): FP8 projections, q/k norm, no bias, our paged cache."""
        return self.block_fp8 and self.block_applies and isinstance(self.attn, PagedAttention)

    def decode_block(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor, norm: Qwen3MoeRMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's residual add and input norm with this attention as one op (``attention_block`` or, with FP8
        projections, ``attention_block_fp8``: a fused kernel where the backend has one) in a decode step on our
        paged cache; None where the layer runs its ops one by one (prefill, vLLM's own ``Attention``, Llama, or
        unquantized weights whose matmul is vLLM's own, i.e. no ``linear`` kernel: vLLM's CPU layers may repack
        them)."""
        attn = self.attn
        if not (self.block_applies and isinstance(attn, PagedAttention) and attn.cache.step["phase"] == "decode"):
            return None
        if not self.block_fp8 and "linear" not in self.ops.kernel_ops:
            return None
        step, qkv, o = attn.cache.step, self.qkv_proj, self.o_proj
        caches = (attn.cache.k[attn.layer], attn.cache.v[attn.layer])
        cached = (*caches, step["slot_mapping"], step["block_tables"], step["context_lens"], attn.scale)
        rope = (self.q_norm.weight, self.k_norm.weight, positions, self.cos_sin_cache)
        if self.block_fp8:
            qkv_w, o_w = (qkv.weight, qkv.weight_scale_inv), (o.weight, o.weight_scale_inv)
            block = self.ops.attention_block_fp8
        else:
            qkv_w, o_w = (qkv.weight,), (o.weight,)
            block = self.ops.attention_block
        out, residual = block(hidden_states, residual, norm.weight, norm.eps, *qkv_w, *rope, *o_w, *cached)
        if self.tp_size > 1:  # what o_proj (RowParallelLinear) does after its matmul
            out = tensor_model_parallel_all_reduce(out)
        return out, residual

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q, k = self.ops.qk_norm_rope(
                q,
                k,
                self.q_norm.weight,
                self.k_norm.weight,
                self.q_norm.eps,
                positions,
                self.cos_sin_cache,
                self.head_dim,
            )
        else:  # Llama: RoPE only
            q, k = self.ops.apply_rope(q, k, positions, self.cos_sin_cache, self.head_dim)  # returns new tensors
        out, _ = self.o_proj(self.attn(q, k, v.contiguous()))
        return out


class Qwen3MoeDecoderLayer(nn.Module):
    def __init__(
        self,
        vllm_config: VllmConfig,
        sizes: Qwen3MoeSizes,
        layer_idx: int,
        opset: ops.OpSet,
        prefix: str = "",
        *,
        attn_factory: AttentionFactory | None = None,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = Qwen3MoeAttention(
            vllm_config,
            sizes,
            opset,
            prefix=f"{prefix}.self_attn",
            layer_idx=layer_idx,
            attn_factory=attn_factory,
            quant_config=quant_config,
        )
        if sizes.is_moe_layer(layer_idx):
            self.mlp: nn.Module = Qwen3MoeSparseMoeBlock(sizes, opset, prefix=f"{prefix}.mlp")
        else:
            self.mlp = Qwen3MoeMLP(
                sizes.hidden_size, sizes.intermediate_size, opset, prefix=f"{prefix}.mlp", quant_config=quant_config
            )
        self.input_layernorm = Qwen3MoeRMSNorm(sizes.hidden_size, sizes.rms_norm_eps, opset)
        self.post_attention_layernorm = Qwen3MoeRMSNorm(sizes.hidden_size, sizes.rms_norm_eps, opset)

    def fp8_decode_arguments(self) -> tuple[torch.Tensor, ...] | None:
        """This layer's tensors for ``decoder_layers_fp8``, in its ``LAYER_LISTS`` order (input norm, q/k/v weight
        and scales, q/k norms, o weight and scales, post-attention norm, router gate, FP8 experts, K and V caches);
        None where the layer does not run both fused FP8 halves in decode steps."""
        attn, mlp = self.self_attn, self.mlp
        if not (attn.fuses_fp8_decode() and isinstance(mlp, Qwen3MoeSparseMoeBlock) and mlp.experts.fp8):
            return None
        qkv, o, experts, cache = attn.qkv_proj, attn.o_proj, mlp.experts, attn.attn.cache
        return (
            self.input_layernorm.weight,
            qkv.weight,
            qkv.weight_scale_inv,
            attn.q_norm.weight,
            attn.k_norm.weight,
            o.weight,
            o.weight_scale_inv,
            self.post_attention_layernorm.weight,
            mlp.gate.weight,
            experts.w13_weight,
            experts.w13_weight_scale_inv,
            experts.w2_weight,
            experts.w2_weight_scale_inv,
            cache.k[attn.attn.layer],
            cache.v[attn.attn.layer],
        )

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        block = None
        if residual is not None:  # the first layer has no residual add to fuse
            block = self.self_attn.decode_block(positions, hidden_states, residual, self.input_layernorm)
        if block is not None:
            hidden_states, residual = block
        elif residual is None:
            residual = hidden_states
            hidden_states = self.self_attn(positions, self.input_layernorm(hidden_states))
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
            hidden_states = self.self_attn(positions, hidden_states)
        if isinstance(self.mlp, Qwen3MoeSparseMoeBlock):  # norm + router + experts as one op
            return self.mlp(hidden_states, residual, self.post_attention_layernorm)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


def _vllm_compiles_here(vllm_config: VllmConfig) -> bool:
    """vLLM compiles the decoder stack itself on its own platforms (CPU here); on our Neuron platform vllm-neuron's
    runner compiles the whole model per bucket (``torch.compile`` in ``NeuronModelRunner.load_model``), so not here."""
    neuron = sys.modules.get("vllm_nki_moe.platforms.neuron")
    return neuron is None or not neuron.platform_active()


# As vLLM's own Qwen3-MoE: Dynamo traces the decoder stack once (token dimension dynamic) and Inductor compiles it,
# unless --enforce-eager. Every op of ours is a custom op (vllm_nki_moe.ops.custom_ops), so the stack is one graph.
@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0}, enable_if=_vllm_compiles_here
)
class Qwen3MoeModel(nn.Module):
    def __init__(
        self,
        *,
        vllm_config: VllmConfig,
        sizes: Qwen3MoeSizes,
        opset: ops.OpSet,
        prefix: str = "",
        attn_factory: AttentionFactory | None = None,
        quant_config: QuantizationConfig | None = None,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(sizes.vocab_size, sizes.hidden_size, prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            Qwen3MoeDecoderLayer(
                vllm_config,
                sizes,
                i,
                opset,
                prefix=f"{prefix}.layers.{i}",
                attn_factory=attn_factory,
                quant_config=quant_config,
            )
            for i in range(sizes.num_hidden_layers)
        )
        self.norm = Qwen3MoeRMSNorm(sizes.hidden_size, sizes.rms_norm_eps, opset)
        self.ops = opset
        self.top_k, self.norm_topk_prob = sizes.num_experts_per_tok, sizes.norm_topk_prob

    def decode_layers(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """A decode step's decoder layers as one op (``decoder_layers_fp8``: one kernel launch with the all-reduces
        inside) where the backend binds its kernel and every layer runs both fused FP8 halves; None elsewhere (the
        layers run one by one). The first layer's residual is zero (x + 0 = x: its plain input norm)."""
        if "decoder_layers_fp8" not in self.ops.kernel_ops:
            return None
        per_layer = [layer.fp8_decode_arguments() for layer in self.layers]
        if any(args is None for args in per_layer):
            return None
        attn = self.layers[0].self_attn
        step = attn.attn.cache.step
        if step["phase"] != "decode":
            return None
        lists = [list(column) for column in zip(*per_layer)]
        out, residual = self.ops.decoder_layers_fp8(
            hidden_states,
            torch.zeros_like(hidden_states),
            *lists,
            positions,
            attn.cos_sin_cache,
            step["slot_mapping"],
            step["block_tables"],
            step["context_lens"],
            self.layers[0].input_layernorm.eps,
            attn.attn.scale,
            self.top_k,
            self.norm_topk_prob,
        )
        hidden_states, _ = self.norm(out, residual)
        return hidden_states

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self, input_ids: torch.Tensor | None, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        in_one_op = self.decode_layers(positions, hidden_states)
        if in_one_op is not None:
            return in_one_op
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class Qwen3MoeForCausalLM(nn.Module):
    """vLLM's text-generation model interface (``vllm/model_executor/models/interfaces_base.py``) for Qwen3-MoE.

    The dense decoders (``models/dense.py``) are this class with another ``architecture``: its sizes decide q/k norm,
    RoPE scaling and whether any layer has experts."""

    architecture = "Qwen3MoeForCausalLM"  # config.json "architectures": what read_sizes checks the config against

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(
        self, *, vllm_config: VllmConfig, prefix: str = "", attn_factory: AttentionFactory | None = None
    ) -> None:
        super().__init__()
        hf_config = vllm_config.model_config.hf_text_config
        self.sizes = read_sizes(hf_config, get_tensor_model_parallel_world_size(), self.architecture)
        if get_pp_group().world_size > 1:
            raise NotImplementedError(
                f"{self.architecture} (vllm_nki_moe): pipeline_parallel_size={get_pp_group().world_size}; "
                "only 1 is supported"
            )
        # --additional-config '{"nki_moe": {"kernels": ...}}' overrides VLLM_NKI_MOE_KERNELS for this server.
        kernels = envs.configured_kernels(vllm_config.additional_config)
        self.opset = ops.bind(kernels, host_ops=True) if kernels else ops.bind()
        model_prefix = f"{prefix}.model" if prefix else "model"
        quant_config = None
        if self.sizes.fp8:  # the projections keep the checkpoint's FP8 weights (models/fp8.py); the LM head does not
            from vllm_nki_moe.models.fp8 import Fp8BlockConfig

            quant_config = Fp8BlockConfig(self.opset)
        self.model = Qwen3MoeModel(
            vllm_config=vllm_config,
            sizes=self.sizes,
            opset=self.opset,
            prefix=model_prefix,
            attn_factory=attn_factory,
            quant_config=quant_config,
        )
        self.lm_head = ParallelLMHead(self.sizes.vocab_size, self.sizes.hidden_size, prefix="lm_head")
        if self.sizes.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(self.sizes.vocab_size)
        if "linear" in self.opset.kernel_ops:  # projections and LM head as NKI kernels; vLLM keeps TP
            from vllm_nki_moe.models.linear_method import route_linears_through_ops

            route_linears_through_ops(self.model, self.lm_head, self.opset)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,  # [num_tokens] int64, all scheduled tokens of the step, flattened
        positions: torch.Tensor,  # [num_tokens] int64, each token's position in its sequence
        intermediate_tensors: IntermediateTensors | None = None,  # pipeline parallelism only: unused
        inputs_embeds: torch.Tensor | None = None,  # [num_tokens, hidden] instead of input_ids
    ) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face checkpoint tensors; returns the parameter names filled (vLLM checks none is missing)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(weight_map.IGNORED_SUFFIXES):
                continue
            if self.sizes.tie_word_embeddings and name == "lm_head.weight":
                continue
            expert = weight_map.EXPERT_WEIGHT.match(name)
            if expert:
                stack, shard = weight_map.EXPERT_TARGETS[expert["proj"]]
                param_name = f"{stack}_{expert['tensor']}"
                experts: Qwen3MoeExperts = self.get_submodule(expert["prefix"])
                if not hasattr(experts, param_name):
                    raise ValueError(
                        f"{self.architecture}.load_weights: checkpoint tensor {name!r} has no parameter (an FP8 scale "
                        "in a checkpoint without quantization_config?)"
                    )
                experts.load_expert_weight(param_name, int(expert["expert"]), shard, tensor)
                loaded.add(f"{expert['prefix']}.{param_name}")
                continue
            for fused, piece, shard_id in weight_map.STACKED_PARAMS:
                if piece in name:
                    target = name.replace(piece, fused)
                    if target in params:
                        params[target].weight_loader(params[target], tensor, shard_id)
                        loaded.add(target)
                        break
            else:
                if name not in params:
                    raise ValueError(f"{self.architecture}.load_weights: checkpoint tensor {name!r} has no parameter")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        # The experts' and the router's one copy: converted in place to the layout the bound ops read (kernel tiles,
        # prepacked experts; the router weight column-major, its transpose being the kernels' layout).
        for name, module in self.named_modules():
            both = {f"{name}.w13_weight", f"{name}.w2_weight"} <= loaded
            if isinstance(module, Qwen3MoeExperts) and both and not module.fp8:
                self.opset.prepare_weights("moe_experts", module.w13_weight, module.w2_weight)
            elif isinstance(module, Qwen3MoeExperts) and both:
                self.opset.prepare_weights(
                    "moe_experts_fp8",
                    module.w13_weight,
                    module.w13_weight_scale_inv,
                    module.w2_weight,
                    module.w2_weight_scale_inv,
                )
            if isinstance(module, Qwen3MoeRouterGate) and f"{name}.weight" in loaded:
                self.opset.prepare_weights("router_gate_topk", module.weight)
        return loaded
