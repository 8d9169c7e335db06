"""Fake neuronx_distributed_inference.modules.moe_v2 (aws-neuron/neuronx-distributed-inference at 4bcdc54): the router
and routed experts initialize_moe_module builds, from the same config fields."""

from neuronx_distributed.modules.moe.expert_mlps_v2 import ExpertMLPsV2, RoutedExpertsMLPOpsConfig
from neuronx_distributed.modules.moe.model import MoE
from neuronx_distributed.modules.moe.routing import RouterTopK


def initialize_moe_module(
    config, rmsnorm=None, init_tkg_module=False, apply_act_fn_over_topk=False, router_bias=False, experts_bias=False
):
    nc = config.neuron_config
    router = RouterTopK(
        num_experts=config.num_local_experts,
        top_k=config.num_experts_per_tok,
        hidden_size=config.hidden_size,
        dtype=nc.router_config.dtype,
        act_fn=nc.router_config.act_fn,
        sequence_parallel_enabled=nc.sequence_parallel_enabled,
        sequence_dimension=1,
        bias=router_bias,
        apply_act_fn_over_topk=apply_act_fn_over_topk,
        store_transposed_weights=init_tkg_module,
    )
    expert_mlps = ExpertMLPsV2(
        routed_experts_mlp_config=RoutedExpertsMLPOpsConfig(
            num_experts=config.num_local_experts,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            is_hidden_dim_shuffled=nc.is_hidden_dim_shuffled,
            is_intermediate_dim_shuffled=nc.is_intermediate_dim_shuffled,
            top_k=config.num_experts_per_tok,
            hidden_act=config.hidden_act,
            bias=experts_bias,
            glu_mlp=nc.glu_mlp,
            glu_type=nc.glu_type,
            hidden_act_scaling_factor=nc.hidden_act_scaling_factor,
            hidden_act_bias=nc.hidden_act_bias,
            gate_clamp_upper_limit=nc.gate_clamp_upper_limit,
            gate_clamp_lower_limit=nc.gate_clamp_lower_limit,
            up_clamp_upper_limit=nc.up_clamp_upper_limit,
            up_clamp_lower_limit=nc.up_clamp_lower_limit,
            early_expert_affinity_modulation=nc.early_expert_affinity_modulation,
            normalize_top_k_affinities=nc.normalize_top_k_affinities,
        ),
        sequence_parallel_enabled=nc.sequence_parallel_enabled,
        dtype=nc.torch_dtype,
    )
    moe = MoE(router=router, expert_mlps=expert_mlps, rmsnorm=rmsnorm, return_router_logits=nc.return_router_logits)
    moe.eval()
    return moe
