"""Fake NxDI Qwen3-MoE model module (src/neuronx_distributed_inference/models/qwen3_moe/modeling_qwen3_moe.py)."""

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


class NeuronQwen3MoEAttention(nn.Module):
    """The attention's RoPE as NxDI's NeuronAttentionBase applies it (attention_base.py apply_rotary_embedding, utils.py
    apply_rotary_pos_emb: Q [B, Hq, S, D] * cos + rotate_half(Q) * sin in Q's dtype, cos/sin unsqueezed at dim 1);
    the polar-compatible path is not modelled."""

    def __init__(self, config):
        super().__init__()
        self.head_dim = config.head_dim
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
