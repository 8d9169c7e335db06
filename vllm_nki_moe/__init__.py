"""vllm-nki-moe: a vLLM plugin serving Qwen3-MoE with NKI kernels on AWS Trainium (and on CPU for development)."""

__version__ = "0.1.0"
