"""Fake neuronx_distributed_inference.modules.moe_v2 (aws-neuron/neuronx-distributed-inference at 4bcdc54): the router
initialize_moe_module builds, from the same config fields."""

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
    moe = MoE(router=router, rmsnorm=rmsnorm, return_router_logits=nc.return_router_logits)
    moe.eval()
    return moe
