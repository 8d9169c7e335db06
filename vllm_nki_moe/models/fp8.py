"""FP8 checkpoints in vLLM's linear layers: block-scaled ``float8_e4m3fn`` weights kept as they are, matmul as
``ops.linear_fp8``.

vLLM's linear layers ask their ``quant_config`` for a method (``LinearBase.__init__`` ->
``quant_config.get_quant_method(layer, prefix)``), the method creates the layer's parameters (``create_weights``) and
runs the matmul (``apply``), and the loader calls its ``process_weights_after_loading`` once (``vllm/model_executor/
layers/linear.py``, ``quantization/base_config.py``). :class:`Fp8BlockConfig` gives the model's projections
:class:`Fp8BlockLinearMethod`: an fp8 ``weight`` and an fp32 ``weight_scale_inv`` per 128 x 128 block, both vLLM's own
parameter classes (``ModelWeightParameter``, ``BlockQuantScaleParameter``) so that vLLM's weight loaders cut the TP
shards and place q/k/v and gate/up pieces in block units; vLLM's ``validate_fp8_block_shape`` rejects a TP degree
that would split a block. After loading the layer keeps the fp8 weight and its scales (no dequantized copy), converted
in place to the kernel's layout under a kernel backend (``ops.fp8.prepare_linear_fp8_for_kernels``).

vLLM picks a checkpoint's quantization method when it builds its config (``ModelConfig._verify_quantization``: a
registered method's ``override_quantization_method`` may claim the checkpoint, custom ones first). Its own ``fp8``
method would reject float32 (and re-quantize or dequantize per platform); so this module registers
:class:`Fp8BlockConfig` as ``NAME`` (``register_quantization_config``, vLLM's plugin hook; imported by the general
plugin in every process), claiming FP8 checkpoints of our architectures. The model builds its own instance bound to
its ops.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.linear import LinearBase, register_weight_loader_v2_supported_method
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.quantization.utils.fp8_utils import (
    create_fp8_scale_parameter,
    create_fp8_weight_parameter,
    validate_fp8_block_shape,
)
from vllm.model_executor.parameter import BlockQuantScaleParameter

from vllm_nki_moe.models.config import ARCHITECTURES
from vllm_nki_moe.ops import OpSet
from vllm_nki_moe.ops.fp8 import BLOCK

WEIGHT_BLOCK = [BLOCK, BLOCK]
NAME = "nki_moe_fp8"  # the quantization method vLLM reports for our FP8 checkpoints


@register_weight_loader_v2_supported_method  # vLLM's block-aware loaders for our parameters
class Fp8BlockLinearMethod(QuantizeMethodBase):
    """A linear layer with a block-scaled FP8 weight; the matmul is ``opset.linear_fp8``."""

    def __init__(self, opset: OpSet) -> None:
        self.opset = opset

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        prefix = getattr(layer, "prefix", "")
        try:
            validate_fp8_block_shape(
                layer, input_size, output_size, input_size_per_partition, output_partition_sizes, WEIGHT_BLOCK
            )
        except ValueError as err:
            raise ValueError(
                f"vllm_nki_moe FP8 {prefix or 'linear'}: {err} (128 x 128 scale blocks; choose a tensor-parallel size "
                "whose shards are whole blocks)"
            ) from None
        loader = extra_weight_attrs.get("weight_loader")
        layer.weight_block_size = WEIGHT_BLOCK  # read by vLLM's merged/QKV loaders to cut scales in block units
        layer.register_parameter(
            "weight", create_fp8_weight_parameter(sum(output_partition_sizes), input_size_per_partition, loader)
        )
        scale = create_fp8_scale_parameter(
            BlockQuantScaleParameter, output_partition_sizes, input_size_per_partition, WEIGHT_BLOCK, loader
        )
        layer.register_parameter("weight_scale_inv", scale)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        y = self.opset.linear_fp8(rows, layer.weight, layer.weight_scale_inv).reshape(*x.shape[:-1], -1)
        return y if bias is None else y + bias

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """The fp8 weight and its scales in the layout the bound ``linear_fp8`` reads (the kernel's under
        ``emulator``/``nki``, converted in place: still one byte per weight; as loaded under ``torch``)."""
        self.opset.prepare_weights("linear_fp8", layer.weight, layer.weight_scale_inv)


@register_quantization_config(NAME)
class Fp8BlockConfig(QuantizationConfig):
    """The model's quant config for an FP8 checkpoint (``config.FP8_SCHEME``, checked by ``read_sizes``): its linear
    layers get :class:`Fp8BlockLinearMethod`; the layers built without it (the LM head, the embedding) stay
    unquantized. ``opset`` None: the instance vLLM builds for its config (``from_config``), which builds no layer."""

    def __init__(self, opset: OpSet | None = None) -> None:
        super().__init__()
        self.opset = opset
        self.weight_block_size = WEIGHT_BLOCK

    def get_name(self) -> str:
        return NAME

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        """Claim ``quant_method: fp8`` checkpoints of the architectures our plugin registers (the scheme's other
        fields are checked at model build, naming the field), unless the user chose another method."""
        architectures = getattr(hf_config, "architectures", None) or ()
        ours = any(a in ARCHITECTURES for a in architectures)
        if ours and hf_quant_cfg.get("quant_method") == "fp8" and user_quant in (None, "fp8", NAME):
            return NAME
        return None

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # weight-only; the matmul runs in the activation dtype

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8BlockConfig:
        return cls()

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            if self.opset is None:
                raise RuntimeError(f"{NAME}: {prefix} built from vLLM's config instance; the model binds its ops")
            return Fp8BlockLinearMethod(self.opset)
        return None
