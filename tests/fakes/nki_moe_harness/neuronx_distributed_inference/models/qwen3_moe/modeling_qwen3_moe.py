"""Fake NxDI Qwen3-MoE model module (src/neuronx_distributed_inference/models/qwen3_moe/modeling_qwen3_moe.py)."""

import math
from enum import Enum

import torch
from neuronx_distributed.utils import cpu_mode
from torch import nn
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

from neuronx_distributed_inference.modules.moe_v2 import initialize_moe_module


class CustomRMSNorm(nn.Module):
    def __init__(self, hidden_size=None, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps


def get_rmsnorm_cls():
    return Qwen3MoeRMSNorm if cpu_mode() else CustomRMSNorm


class MoENeuronConfig:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class Qwen3MoeInferenceConfig:
    def __init__(self, neuron_config, load_config=None, **kwargs):
        self.neuron_config = neuron_config
        self.__dict__.update(kwargs)

    @classmethod
    def get_neuron_config_cls(cls):
        return MoENeuronConfig


class RotaryEmbedding(nn.Module):
    """NxDI's modules/attention/utils.py RotaryEmbedding (4bcdc54): cos/sin of cat(freqs, freqs) for position_ids
    [B, S], in fp32, cast to x's dtype; [B, S, D] each."""

    def __init__(self, dim, max_position_embeddings=2048, base=10000):
        super().__init__()
        self.dim, self.max_position_embeddings, self.base = dim, max_position_embeddings, base

    @torch.no_grad()
    def forward(self, x, position_ids):
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float) / self.dim))
        freqs = inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1) @ position_ids[:, None, :].float()
        emb = torch.cat((freqs.transpose(1, 2), freqs.transpose(1, 2)), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FlashAttentionStrategy(Enum):  # attention_base.py
    NONE = 0
    UNSHARDED_KERNEL = 1
    SHARDED_KERNEL = 2


def repeat_kv(hidden_states, n_rep):
    """NxDI's modules/attention/utils.py repeat_kv: [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D], kv head g serving query
    heads g * n_rep .. g * n_rep + n_rep - 1."""
    batch, kv_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    expanded = hidden_states[:, :, None, :, :].expand(batch, kv_heads, n_rep, slen, head_dim)
    return expanded.reshape(batch, kv_heads * n_rep, slen, head_dim)


def manual_softmax(prior_scores, active_scores, is_speculation):
    """NxDI's modules/attention/utils.py manual_softmax: one softmax over the prior and active scores."""
    max_score = torch.max(prior_scores, dim=-1, keepdim=True)[0]
    max_active_score = torch.max(active_scores, dim=-1, keepdim=True)[0]
    max_score = (
        torch.maximum(max_score, max_active_score) if is_speculation else torch.maximum(max_score, active_scores)
    )
    exp_prior = torch.exp(prior_scores - max_score)
    exp_active = torch.exp(active_scores - max_score)
    denominator = exp_prior.sum(dim=-1, keepdim=True) + exp_active.sum(dim=-1, keepdim=True)
    return exp_prior / denominator, exp_active / denominator


class NeuronQwen3MoEAttention(nn.Module):
    """NxDI's NeuronAttentionBase (modules/attention/attention_base.py at ef2731e, the Neuron SDK 2.29 sync, unchanged
    at 4bcdc54) as far as the drop-in's hooks touch
    it, per rank (config.num_attention_heads / num_key_value_heads are this rank's heads here):

    - RoPE as apply_rotary_embedding / utils.py apply_rotary_pos_emb apply it (Q [B, Hq, S, D] * cos + rotate_half(Q) *
      sin in Q's dtype, cos/sin unsqueezed at dim 1); the polar-compatible path is not modelled;
    - context encoding: perform_prefill's native-compiler path (FlashAttentionStrategy.NONE): scaled_qk with the mask,
      softmax in fp32, probabilities in Q's dtype, @ V after repeat_kv; returns (BHSD output, strategy); its flash
      kernel paths are not modelled (they raise); get_flash_attention_strategy without context parallelism;
    - token generation: compute_for_token_gen, the prior (cache [B, Hkv, S, D], masked by attention_mask, True where
      i < computed context length) and active parts in one manual_softmax.
    """

    def __init__(self, config):
        super().__init__()
        neuron_config = config.neuron_config
        self.neuron_config = neuron_config
        self.head_dim = config.head_dim
        self.num_heads = getattr(config, "num_attention_heads", 1)
        self.num_key_value_heads = getattr(config, "num_key_value_heads", 1)
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.softmax_scale = math.sqrt(self.head_dim)
        self.torch_dtype = getattr(neuron_config, "torch_dtype", torch.bfloat16)
        self.padding_side = getattr(neuron_config, "padding_side", "right")
        self.flash_decoding_enabled = getattr(neuron_config, "flash_decoding_enabled", False)
        self.attn_kernel_enabled = getattr(neuron_config, "attn_kernel_enabled", None)
        self.logical_nc_config = getattr(neuron_config, "logical_nc_config", 1)
        self.sliding_window = getattr(config, "sliding_window", None)
        self.k_cache_transposed = getattr(neuron_config, "k_cache_transposed", False) and self.sliding_window is None
        self.cp_degree = getattr(neuron_config, "cp_degree", 1)
        self.dp_degree = getattr(neuron_config, "attention_dp_degree", 1)
        self.learned_sinks_size = None
        self.attention_chunk_size = None
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, max_position_embeddings=config.max_position_embeddings, base=config.rope_theta
        )
        self.q_layernorm = get_rmsnorm_cls()(config.head_dim, config.rms_norm_eps)
        self.k_layernorm = get_rmsnorm_cls()(config.head_dim, config.rms_norm_eps)

    def apply_rotary_embedding(self, Q, K, V, position_ids, cos_cache, sin_cache, use_polar_compatible_rope):
        if use_polar_compatible_rope:
            raise NotImplementedError("fake attention: polar-compatible RoPE is not modelled")
        if self.rotary_emb is not None:
            if cos_cache is None or sin_cache is None:
                cos_cache, sin_cache = self.rotary_emb(V, position_ids)
            cos, sin = cos_cache.unsqueeze(1), sin_cache.unsqueeze(1)
            Q, K = Q * cos + _rotate_half(Q) * sin, K * cos + _rotate_half(K) * sin
        return Q, K, cos_cache, sin_cache

    def get_learned_sinks(self):
        return None

    def scaled_qk(self, Q, K, attention_mask):
        QK = torch.matmul(Q, K.transpose(2, 3)) / self.softmax_scale
        if attention_mask is not None:
            QK = torch.where(attention_mask.to(torch.bool), QK, torch.finfo(QK.dtype).min)
        return QK

    def get_flash_attention_strategy(self, q_len, has_attention_mask):
        if self.attn_kernel_enabled is False:
            return FlashAttentionStrategy.NONE
        if int(self.logical_nc_config) > 1:
            if has_attention_mask:
                if q_len >= 1024:
                    if q_len % 512 == 0:
                        return FlashAttentionStrategy.SHARDED_KERNEL
                elif q_len % 256 == 0:
                    return FlashAttentionStrategy.SHARDED_KERNEL
                return FlashAttentionStrategy.NONE
            return FlashAttentionStrategy.SHARDED_KERNEL
        if q_len >= 4096:
            return FlashAttentionStrategy.UNSHARDED_KERNEL
        if self.attn_kernel_enabled and q_len >= 512:
            return FlashAttentionStrategy.UNSHARDED_KERNEL
        return FlashAttentionStrategy.NONE

    def perform_prefill(self, Q, K, V, q_len, bsz, attention_mask):
        strategy = self.get_flash_attention_strategy(q_len, attention_mask is not None)
        if strategy != FlashAttentionStrategy.NONE:
            raise NotImplementedError(f"fake attention: NxDI's flash attention kernel ({strategy}) is not modelled")
        K_active = repeat_kv(K, self.num_key_value_groups)
        V_active = repeat_kv(V, self.num_key_value_groups)
        scores = self.scaled_qk(Q, K_active, attention_mask)
        probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(Q.dtype)
        return torch.matmul(probs, V_active), strategy

    def compute_for_token_gen(
        self, Q, K, V, position_ids, past_key_value, attention_mask, active_mask, is_prefix_caching=False
    ):
        is_speculation = False if position_ids is None else position_ids.shape[-1] > 1
        K_prior = repeat_kv(past_key_value[0], self.num_key_value_groups)
        V_prior = repeat_kv(past_key_value[1], self.num_key_value_groups)
        if not self.k_cache_transposed:
            K_prior = K_prior.transpose(2, 3)
        prior_scores = torch.matmul(Q, K_prior) / self.softmax_scale
        if prior_scores.shape[-1] > attention_mask.shape[-1] and getattr(self.neuron_config, "apply_seq_ids_mask", 0):
            pad = prior_scores.shape[-1] - attention_mask.shape[-1]  # the cache's padding slots (kvcache/utils.py)
            attention_mask = nn.functional.pad(attention_mask, (0, pad), "constant", 0)
        prior_scores = torch.where(attention_mask, prior_scores, torch.finfo(prior_scores.dtype).min)
        prior_scores = prior_scores.to(torch.float32)
        K_active = repeat_kv(K, self.num_key_value_groups)
        V_active = repeat_kv(V, self.num_key_value_groups)
        active_scores = torch.matmul(Q, K_active.transpose(2, 3)) / self.softmax_scale
        if is_speculation or is_prefix_caching:
            active_scores = torch.where(active_mask, active_scores, torch.finfo(active_scores.dtype).min)
        active_scores = active_scores.to(torch.float32)
        softmax_prior, softmax_active = manual_softmax(prior_scores, active_scores, is_speculation or is_prefix_caching)
        softmax_prior, softmax_active = softmax_prior.to(Q.dtype), softmax_active.to(Q.dtype)
        return torch.matmul(softmax_prior, V_prior) + torch.matmul(softmax_active, V_active)


class NeuronQwen3MoeDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.self_attn = NeuronQwen3MoEAttention(config)
        self.moe_fused_nki_kernel_enabled = getattr(config, "moe_fused_nki_kernel_enabled", False)
        self.input_layernorm = get_rmsnorm_cls()(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = get_rmsnorm_cls()(config.hidden_size, eps=config.rms_norm_eps)
        if self.moe_fused_nki_kernel_enabled:
            self.mlp = initialize_moe_module(config=config, rmsnorm=self.post_attention_layernorm, init_tkg_module=True)
        else:
            self.mlp = initialize_moe_module(config=config)


class NeuronBaseModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.setup_attr_for_model(config)
        self.init_model(config)


class NeuronQwen3MoeModel(NeuronBaseModel):
    def setup_attr_for_model(self, config):
        self.hidden_size = config.hidden_size

    def init_model(self, config):
        self.layers = nn.ModuleList([NeuronQwen3MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = get_rmsnorm_cls()(self.hidden_size, eps=config.rms_norm_eps)


class NeuronBaseForCausalLM:
    _model_cls = None

    def __init__(self, model_path, config=None):
        self.model_path = model_path
        self.config = config

    @classmethod
    def get_config_cls(cls):
        raise NotImplementedError

    @classmethod
    def get_neuron_config_cls(cls):
        return cls.get_config_cls().get_neuron_config_cls()

    def build_model(self):  # stands in for NxDI building _model_cls inside compile()/load()
        return self._model_cls(self.config)

    def compile(self, compiled_model_path, debug=False):
        self.compiled = (compiled_model_path, debug)

    def load(self, compiled_model_path):
        self.loaded = compiled_model_path


class NeuronQwen3MoeForCausalLM(NeuronBaseForCausalLM):
    _model_cls = NeuronQwen3MoeModel

    @classmethod
    def get_config_cls(cls):
        return Qwen3MoeInferenceConfig
