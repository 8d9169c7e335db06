"""Per-tensor-parallel-rank kernel shapes, derived from a Hugging Face ``config.json`` (Qwen3-MoE, or the dense Qwen3
and Llama architectures our classes serve) and a TP degree.

The config is read and validated by ``vllm_nki_moe.models.config.read_sizes`` (the model's own reader), so the check
tool accepts exactly the configs the model accepts. Without a config file, Qwen3-30B-A3B's published values
(``QWEN3_30B_A3B``) are used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from vllm_nki_moe.models.config import read_sizes

# Qwen/Qwen3-30B-A3B config.json (huggingface.co/Qwen/Qwen3-30B-A3B), the fields read_sizes reads.
QWEN3_30B_A3B: dict = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}

# Sequence length the decode cases assume for the KV cache: the contest's 640 tokens (prompt + generated,
# research/contest.md), a realistic batch-1 serving length.
DEFAULT_CONTEXT_LEN = 640


class ShapesError(ValueError):
    """A config or TP degree the kernels cannot be shaped for; the message names the field, value and rule."""


@dataclass(frozen=True)
class KernelShapes:
    """Sizes one tensor-parallel rank's kernels see (what ``cases_<family>.cases`` build inputs from).

    ``q_heads``/``kv_heads``/``moe_intermediate``/``intermediate`` are per rank; fewer kv heads than ranks are
    replicated (one per rank), as vLLM's QKVParallelLinear does. ``experts`` are not split (TP shards I).
    """

    name: str  # where the sizes came from: "Qwen3-30B-A3B" or the config path
    tp: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    norm_topk_prob: bool
    moe_intermediate: int
    intermediate: int
    vocab: int
    layers: int
    moe_layers: int
    rms_eps: float
    rope_theta: float
    max_positions: int
    context_len: int = DEFAULT_CONTEXT_LEN
    dtype: str = "bfloat16"  # activation dtype of the cases ("bfloat16": the hardware path; or "float32")
    qk_norm: bool = True  # Qwen3: q/k RMSNorm fused with RoPE (qk_norm_rope); Llama: RoPE alone (rope)
    # The step of an FP8 checkpoint: block-scaled FP8 experts (moe_decode_fp8 instead of the fused block) and
    # projections (linear_fp8 for q/k/v, o and the dense MLP; the LM head stays bf16, as in Qwen's checkpoints).
    fp8: bool = False

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def describe(self) -> str:
        mlp = (
            f"experts {self.experts} top-{self.top_k}, expert intermediate {self.moe_intermediate}"
            if self.experts
            else f"dense MLP intermediate {self.intermediate}"
        )
        return (
            f"{self.name} TP={self.tp}: hidden {self.hidden}, q/kv heads {self.q_heads}/{self.kv_heads} x "
            f"{self.head_dim}, {mlp}, {self.layers} layers ({self.moe_layers} MoE)"
        )


def load_config(path: str | Path | None) -> tuple[str, dict]:
    """(name, config dict) from a ``config.json`` path, or Qwen3-30B-A3B's values for None."""
    if path is None:
        return "Qwen3-30B-A3B", dict(QWEN3_30B_A3B)
    p = Path(path)
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise ShapesError(f"kernel_check: config={str(p)!r}; file not found") from None
    except json.JSONDecodeError as err:
        raise ShapesError(f"kernel_check: config={str(p)!r}; not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise ShapesError(f"kernel_check: config={str(p)!r}; must hold a JSON object")
    return str(p), cfg


def model_config_path(model: str) -> str:
    """``config.json`` of ``model``: a checkpoint directory, or a Hugging Face model id (fetched into, or read from,
    the Hugging Face cache, as vLLM and transformers fetch it)."""
    local = Path(model)
    if local.is_dir():
        return str(local / "config.json")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(model, "config.json")
    except Exception as err:  # noqa: BLE001 - offline, gated, unknown id: one line naming the model and the cause
        raise ShapesError(
            f"kernel_check: model={model!r}; not a directory, and its config.json could not be fetched from the "
            f"Hugging Face hub ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None


def kernel_shapes(config: str | Path | dict | None = None, tp: int = 1, dtype: str = "bfloat16") -> KernelShapes:
    """Per-rank shapes for ``config`` (a path, a dict of HF fields, or None for Qwen3-30B-A3B) at TP degree ``tp``.

    Raises ShapesError naming the field, its value and the rule when the config is incomplete or ``tp`` does not
    divide it.
    """
    if isinstance(config, dict):
        name, cfg = "custom config", dict(config)
    else:
        name, cfg = load_config(config)
    if not isinstance(tp, int) or tp < 1:
        raise ShapesError(f"kernel_check: tp={tp!r}; must be a positive integer")
    if dtype not in ("bfloat16", "float32"):
        raise ShapesError(f"kernel_check: dtype={dtype!r}; must be bfloat16 or float32")
    architecture = (cfg.get("architectures") or ["Qwen3MoeForCausalLM"])[0]
    try:
        sizes = read_sizes(SimpleNamespace(**cfg), tp_size=tp, architecture=architecture)
    except AttributeError as err:
        raise ShapesError(f"kernel_check: config {name} lacks a required field ({err})") from None
    except (ValueError, NotImplementedError) as err:
        raise ShapesError(f"kernel_check: {err}") from None
    moe_layers = sum(sizes.is_moe_layer(i) for i in range(sizes.num_hidden_layers))
    if moe_layers < sizes.num_hidden_layers and sizes.intermediate_size % tp:
        raise ShapesError(
            f"kernel_check: intermediate_size={sizes.intermediate_size} is not divisible by tp={tp}; the config has "
            f"{sizes.num_hidden_layers - moe_layers} dense MLP layer(s), whose intermediate size TP splits"
        )
    return KernelShapes(
        name=name,
        tp=tp,
        hidden=sizes.hidden_size,
        q_heads=sizes.num_attention_heads // tp,
        kv_heads=max(1, sizes.num_key_value_heads // tp),
        head_dim=sizes.head_dim,
        experts=sizes.num_experts,
        top_k=sizes.num_experts_per_tok,
        norm_topk_prob=sizes.norm_topk_prob,
        moe_intermediate=sizes.moe_intermediate_size // tp,
        intermediate=sizes.intermediate_size // tp if sizes.intermediate_size % tp == 0 else 0,
        vocab=sizes.vocab_size,
        layers=sizes.num_hidden_layers,
        moe_layers=moe_layers,
        rms_eps=sizes.rms_norm_eps,
        rope_theta=sizes.rope_theta,
        max_positions=sizes.max_position_embeddings,
        dtype=dtype,
        qk_norm=sizes.qk_norm,
    )
