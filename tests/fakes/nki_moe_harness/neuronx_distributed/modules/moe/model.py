"""Fake neuronx_distributed.modules.moe.model.MoE (fbac349, "Release 2.29"): the attributes the drop-in reads (router,
rmsnorm, return_router_logits); the experts are not modelled."""

from torch import nn


class MoE(nn.Module):
    def __init__(self, router, expert_mlps=None, rmsnorm=None, return_router_logits=False, **kwargs):
        super().__init__()
        self.router, self.expert_mlps, self.rmsnorm = router, expert_mlps, rmsnorm
        self.return_router_logits = return_router_logits
