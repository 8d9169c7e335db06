"""vLLM's linear layers with their matmul through ``ops.linear``, tensor parallelism left to vLLM.

vLLM's ``LinearBase.forward`` calls ``self.quant_method.apply(self, x, bias)``, ``LogitsProcessor`` calls
``lm_head.quant_method.apply(lm_head, hidden_states, bias=...)``, and the model loader calls every module's
``quant_method.process_weights_after_loading(module)`` once after loading (``vllm/model_executor/layers/linear.py``,
``logits_processor.py``, ``model_loader/utils.py``). Swapping the quant method of the model's projections and LM head
for :class:`OpsLinearMethod` keeps vLLM's sharded weights, weight loaders and all-reduces and runs the matmul as our
op; its ``process_weights_after_loading`` stores the weight in the layout the bound op reads (instead of vLLM's CPU
GEMM pre-packing, which would drop the weight the kernel needs).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

from vllm_nki_moe.ops import OpSet


class OpsLinearMethod(QuantizeMethodBase):
    """The matmul of a vLLM linear layer (or LM head) as ``opset.linear``; other calls go to the method it replaces."""

    def __init__(self, opset: OpSet, replaced: QuantizeMethodBase) -> None:
        self.opset = opset
        self.replaced = replaced

    def create_weights(self, *args, **kwargs):
        return self.replaced.create_weights(*args, **kwargs)

    def embedding(self, layer: nn.Module, input_: torch.Tensor) -> torch.Tensor:
        return self.replaced.embedding(layer, input_)  # a tied LM head is also the embedding

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self.opset.linear(x.reshape(-1, x.shape[-1]), layer.weight).reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.opset.prepare_weights("linear", layer.weight)


def route_linears_through_ops(model: nn.Module, lm_head: nn.Module, opset: OpSet) -> None:
    """Give every vLLM linear layer of ``model`` and ``lm_head`` an :class:`OpsLinearMethod`."""
    from vllm_nki_moe.models.fp8 import Fp8BlockLinearMethod

    layers = [m for m in model.modules() if isinstance(m, LinearBase)] + [lm_head]
    for layer in layers:
        # FP8 layers already run their matmul as an op (ops.linear_fp8)
        if not isinstance(layer.quant_method, (OpsLinearMethod, Fp8BlockLinearMethod)):
            layer.quant_method = OpsLinearMethod(opset, layer.quant_method)
