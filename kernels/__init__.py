"""Device side: NKI kernels, one family per file, each beside its PyTorch reference.

Installed as ``vllm_nki_moe.kernels``. Only ``vllm_nki_moe.ops`` imports these modules.
"""
