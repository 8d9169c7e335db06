"""Fake neuronx_distributed.modules.moe.routing: RouterTopK as aws-neuron/neuronx-distributed at fbac349 ("Release
2.29", src/neuronx_distributed/modules/moe/routing.py) computes it at inference (no jitter, no sequence-parallel
gather): logits = linear_router(hidden cast to the router's dtype) flattened to [T, E]; affinities = the activation
over all experts in float64 (softmax or sigmoid), or over the top-k logits when apply_act_fn_over_topk; expert_index =
torch.topk of the logits; affinities cast to the hidden dtype, index to long. The drop-in's router hook is tested
against this."""

import torch
import torch.nn.functional as F


class RouterBase(torch.nn.Module):
    def __init__(
        self,
        num_experts,
        top_k,
        hidden_size,
        act_fn,
        sequence_parallel_enabled=False,
        sequence_dimension=None,
        dtype=torch.float32,
        device=torch.device("cpu"),
        bias=False,
        tensor_model_parallel_group=None,
        jitter_eps=0.0,
        store_transposed_weights=False,
        apply_act_fn_over_topk=False,
    ):
        super().__init__()
        if act_fn not in {"sigmoid", "softmax"}:
            raise ValueError("act_fn must be either 'sigmoid' or 'softmax'")
        self.num_experts, self.top_k, self.hidden_size, self.act_fn = num_experts, top_k, hidden_size, act_fn
        self.sequence_parallel_enabled, self.sequence_dimension = sequence_parallel_enabled, sequence_dimension
        self.dtype, self.bias, self.jitter_eps = dtype, bias, jitter_eps
        self.store_transposed_weights, self.apply_act_fn_over_topk = store_transposed_weights, apply_act_fn_over_topk
        self.linear_router = torch.nn.Linear(hidden_size, num_experts, dtype=dtype, device=device, bias=bias)

    def get_router_logits(self, hidden_states):
        router_logits = self.linear_router(hidden_states.to(dtype=self.linear_router.weight.dtype))
        return router_logits.view(-1, self.num_experts)

    def apply_activation_fn(self, weights):
        if self.act_fn == "sigmoid":
            return torch.sigmoid(weights.to(dtype=torch.float64))
        return F.softmax(weights, dim=1, dtype=torch.float64)


class RouterTopK(RouterBase):
    def __init__(self, num_experts, top_k, hidden_size, act_fn="softmax", dtype=torch.float32, **kwargs):
        super().__init__(num_experts, top_k, hidden_size, act_fn, dtype=dtype, **kwargs)

    def forward(self, hidden_states):
        router_logits = self.get_router_logits(hidden_states)
        if self.apply_act_fn_over_topk:
            expert_affinities = torch.zeros_like(router_logits, dtype=torch.float64)
            topk_weights, expert_index = torch.topk(router_logits.to(torch.float64), self.top_k, dim=1)
            expert_affinities = expert_affinities.scatter_(1, expert_index, self.apply_activation_fn(topk_weights))
        else:
            expert_affinities = self.apply_activation_fn(router_logits)
            _, expert_index = torch.topk(router_logits, self.top_k)
        return router_logits, expert_affinities.to(dtype=hidden_states.dtype), expert_index.detach().to(torch.long)
