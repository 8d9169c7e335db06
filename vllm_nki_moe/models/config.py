"""The sizes the model needs, read once from a Hugging Face config and checked there: Qwen3-MoE, and the dense
decoders built from the same layers (Qwen3, Llama 3.x).

Unsupported configurations are rejected at construction with the field, its value and the rule, never later in a
forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

# The architectures our classes serve (config.json "architectures"), and what differs between them: q/k RMSNorm
# before RoPE (Qwen3 families) and the RoPE scalings accepted beyond the default.
QK_NORM = {"Qwen3MoeForCausalLM": True, "Qwen3ForCausalLM": True, "LlamaForCausalLM": False}
ARCHITECTURES = tuple(QK_NORM)
ROPE_TYPES = {
    "Qwen3MoeForCausalLM": ("default",),
    "Qwen3ForCausalLM": ("default",),
    "LlamaForCausalLM": ("default", "llama3"),
}


@dataclass(frozen=True)
class Qwen3MoeSizes:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP layers
    moe_intermediate_size: int  # per expert, whole (not per rank)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    attention_bias: bool
    tie_word_embeddings: bool
    qk_norm: bool = True  # per-head RMSNorm of q and k before RoPE (Qwen3)
    # Llama 3 RoPE scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_llama3: tuple[float, float, float, int] | None = None
    # Block-scaled FP8 weights (quantization_config of Qwen's FP8 checkpoints): projections and experts in
    # float8_e4m3fn with 128 x 128 fp32 block scales; embeddings, norms, router and LM head unquantized
    fp8: bool = False

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Qwen3-MoE's rule, as transformers and vLLM apply it."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


# The one FP8 scheme served: Qwen's (and DeepSeek's) fine-grained FP8 checkpoints, weight-only.
FP8_SCHEME = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
# modules_to_not_convert entries (module names, by their ending) that this plugin keeps unquantized anyway
FP8_UNQUANTIZED = ("lm_head", "embed_tokens", "mlp.gate", "norm")


def _fp8(hf_config, where: str) -> bool:
    """Whether the checkpoint is FP8 (``quantization_config``); anything but ``FP8_SCHEME`` is an error naming the
    field. ``activation_scheme`` is the checkpoint's suggestion for activation quantization; activations stay in the
    model dtype here (weight-only), which needs no activation scales, so 'dynamic' is the only value accepted (a
    'static' checkpoint would carry activation scales this plugin would silently ignore)."""
    quant = getattr(hf_config, "quantization_config", None)
    if quant is None:
        return False
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    supported = ", ".join(f"{k}={v!r}" for k, v in FP8_SCHEME.items())
    for key, want in FP8_SCHEME.items():
        value = quant.get(key)
        if key == "weight_block_size" and value is not None:
            value = list(value)
        if value != want:
            raise NotImplementedError(
                f"{where}: quantization_config.{key}={value!r}; supported: {supported} (Qwen's FP8 checkpoints)"
            )
    for module in quant.get("modules_to_not_convert") or ():
        if not module.endswith(FP8_UNQUANTIZED):  # "norm": layernorms, q/k norms, the final norm
            raise NotImplementedError(
                f"{where}: quantization_config.modules_to_not_convert lists {module!r}; only the modules kept "
                f"unquantized anyway ({', '.join(FP8_UNQUANTIZED)}) may be listed"
            )
    return True


LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(hf_config, architecture: str) -> tuple[float, tuple | None]:
    """(theta, llama3 scaling or None); a RoPE type the architecture's class does not implement is an error."""
    where = f"{architecture} (vllm_nki_moe)"
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or params.get("type") or scaling.get("rope_type") or scaling.get("type")
    allowed = ROPE_TYPES[architecture]
    if (rope_type or "default") not in allowed:
        raise NotImplementedError(
            f"{where}: rope_type={rope_type!r}; supported: {', '.join(allowed)} (config rope_parameters.rope_type)"
        )
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError(f"{where}: the config has no rope_theta")
    if rope_type != "llama3":
        return float(theta), None
    fields = {**scaling, **params}
    missing = [f for f in LLAMA3_FIELDS if f not in fields]
    if missing:
        raise ValueError(f"{where}: rope_type='llama3' needs {', '.join(missing)} in rope_parameters")
    factor, low, high, original = (fields[f] for f in LLAMA3_FIELDS)
    if not (float(factor) > 0 and 0 < float(low) < float(high) and int(original) > 0):
        raise ValueError(
            f"{where}: llama3 rope factor={factor}, low_freq_factor={low}, high_freq_factor={high}, "
            f"original_max_position_embeddings={original}; need factor > 0, 0 < low < high, original > 0"
        )
    return float(theta), (float(factor), float(low), float(high), int(original))


def read_sizes(hf_config, tp_size: int = 1, architecture: str = "Qwen3MoeForCausalLM") -> Qwen3MoeSizes:
    """Read and validate for ``architecture`` (one of ``QK_NORM``'s); ``tp_size`` is the tensor-parallel degree the
    sizes will be split by. Dense architectures have no experts (every layer a dense SwiGLU MLP)."""
    if architecture not in QK_NORM:
        raise NotImplementedError(
            f"vllm_nki_moe: architecture {architecture!r}; supported: {', '.join(QK_NORM)} (config architectures)"
        )
    moe = architecture == "Qwen3MoeForCausalLM"
    theta, llama3 = _rope(hf_config, architecture)
    heads = hf_config.num_attention_heads
    sizes = Qwen3MoeSizes(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=getattr(hf_config, "intermediate_size", 0),
        moe_intermediate_size=hf_config.moe_intermediate_size if moe else 0,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=getattr(hf_config, "num_key_value_heads", heads),
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        num_experts=hf_config.num_experts if moe else 0,
        num_experts_per_tok=hf_config.num_experts_per_tok if moe else 0,
        norm_topk_prob=bool(getattr(hf_config, "norm_topk_prob", False)),
        decoder_sparse_step=getattr(hf_config, "decoder_sparse_step", 1) or 1,
        mlp_only_layers=tuple(getattr(hf_config, "mlp_only_layers", None) or ()),
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=theta,
        max_position_embeddings=getattr(hf_config, "max_position_embeddings", 8192),
        attention_bias=bool(getattr(hf_config, "attention_bias", False)),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qk_norm=QK_NORM[architecture],
        rope_llama3=llama3,
        fp8=_fp8(hf_config, f"{architecture} (vllm_nki_moe)"),
    )
    where = f"{architecture} (vllm_nki_moe)"
    if getattr(hf_config, "mlp_bias", False):
        raise NotImplementedError(f"{where}: mlp_bias=True; only bias-free MLPs are supported")
    if not moe and not sizes.intermediate_size:
        raise ValueError(f"{where}: intermediate_size={sizes.intermediate_size}; the dense MLP needs a width")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise NotImplementedError(f"{where}: hidden_act={act!r}; only 'silu' is supported")
    shared = getattr(hf_config, "shared_expert_intermediate_size", 0) or 0
    if shared > 0:
        raise NotImplementedError(
            f"{where}: shared_expert_intermediate_size={shared}; shared experts are not supported"
        )
    if sizes.num_experts_per_tok > sizes.num_experts:
        raise ValueError(
            f"{where}: num_experts_per_tok={sizes.num_experts_per_tok} exceeds num_experts={sizes.num_experts}"
        )
    if heads % tp_size:
        raise ValueError(f"{where}: num_attention_heads={heads} is not divisible by tensor_parallel_size={tp_size}")
    kv = sizes.num_key_value_heads
    if (kv >= tp_size and kv % tp_size) or (kv < tp_size and tp_size % kv):
        raise ValueError(
            f"{where}: num_key_value_heads={kv} and tensor_parallel_size={tp_size}; one must divide the other"
        )
    if sizes.moe_intermediate_size % tp_size:
        raise ValueError(
            f"{where}: moe_intermediate_size={sizes.moe_intermediate_size} is not divisible by "
            f"tensor_parallel_size={tp_size}"
        )
    if sizes.head_dim % 2:
        raise ValueError(f"{where}: head_dim={sizes.head_dim}; rotary embedding needs an even head_dim")
    return sizes
