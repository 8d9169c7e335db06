"""Fake neuronx_distributed.modules.moe.expert_mlps_v2 (aws-neuron/neuronx-distributed at fbac349, "Release 2.29"):
ExpertMLPsV2 with the fields the drop-in's decode hook reads and its token-generation math, as
forward_selective_loading and experts.py's mlp_op compute it in the hidden dtype: per token, gate_up = x @
gate_up_proj[e] ([E, H, 2I], gate columns then up), silu(gate) * up, @ down_proj[e] ([E, I, H]), times the chosen
experts' affinities (F.normalize(p=1) when normalize_top_k_affinities), summed. Dropless context encoding
(capacity_factor None: forward_all_experts or forward_blockwise) computes the same sum, so the fake computes it the
same way for any seq_len; token dropping (a capacity factor) is not modelled."""

import torch
import torch.nn.functional as F
from torch import nn


class RoutedExpertsMLPOpsConfig:
    def __init__(
        self,
        num_experts,
        hidden_size,
        intermediate_size,
        top_k,
        hidden_act,
        glu_mlp,
        bias=False,
        glu_type="glu",
        hidden_act_scaling_factor=1.0,
        hidden_act_bias=0.0,
        is_hidden_dim_shuffled=False,
        is_intermediate_dim_shuffled=False,
        gate_clamp_upper_limit=None,
        gate_clamp_lower_limit=None,
        up_clamp_upper_limit=None,
        up_clamp_lower_limit=None,
        early_expert_affinity_modulation=False,
        normalize_top_k_affinities=False,
        capacity_factor=None,
        **others,
    ):
        self.__dict__.update({k: v for k, v in locals().items() if k not in ("self", "others")})
        self.__dict__.update(others)


class _ExpertWeight(nn.Module):
    def __init__(self, shape, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)


class _MLPOp(nn.Module):
    def __init__(self, cfg, dtype):
        super().__init__()
        E, H, inter = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = _ExpertWeight((E, H, 2 * inter), dtype)
        self.down_proj = _ExpertWeight((E, inter, H), dtype)

    def forward(self, hidden_states, expert_indices):
        x = hidden_states.reshape(1, -1)  # (1, 1, H)
        gate, up = torch.chunk(x @ self.gate_up_proj.weight[expert_indices], chunks=2, dim=-1)  # (k, 1, I) each
        return (F.silu(gate) * up) @ self.down_proj.weight[expert_indices]  # (k, 1, H)


class _Group:
    def size(self):
        return 1


class ExpertMLPsV2(nn.Module):
    def __init__(self, routed_experts_mlp_config, dtype=torch.float32, sequence_parallel_enabled=False, **kwargs):
        super().__init__()
        self.routed_experts_mlp_config = routed_experts_mlp_config
        self.sequence_parallel_enabled = sequence_parallel_enabled
        self.moe_expert_model_parallel_group = _Group()
        self.mlp_op = _MLPOp(routed_experts_mlp_config, dtype)
        self.training = False

    def get_mlp_op(self):
        return self.mlp_op

    def forward(self, hidden_states, expert_affinities, expert_index, seq_len, padding_mask=None, **kwargs):
        if seq_len != 1 and self.routed_experts_mlp_config.capacity_factor is not None:
            raise NotImplementedError("fake ExpertMLPsV2: token dropping (capacity_factor) is not modelled")
        T = hidden_states.shape[0]
        chosen = expert_affinities[torch.arange(T).unsqueeze(1), expert_index]
        if self.routed_experts_mlp_config.normalize_top_k_affinities:
            chosen = F.normalize(chosen, p=1.0, dim=1)
        rows = []
        for t in range(T):
            mlp = self.mlp_op(hidden_states[t].unsqueeze(0).unsqueeze(1), expert_indices=expert_index[t])
            rows.append(torch.sum(mlp.squeeze(1) * chosen[t].unsqueeze(1), dim=0))
        return torch.stack(rows, dim=0)
