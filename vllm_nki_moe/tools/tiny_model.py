"""Write a small random-weight checkpoint that vLLM and Hugging Face transformers both load: Qwen3-MoE by default,
or a dense Qwen3 or Llama 3 (``arch``).

The checkpoint has what a real one has: ``config.json`` (architecture ``Qwen3MoeForCausalLM``, ``Qwen3ForCausalLM``
or ``LlamaForCausalLM``), safetensors weights under the tensor names Qwen/Qwen3-30B-A3B ships (one tensor per expert
projection; Qwen3 and Llama 3.2 dense names for the dense models), a byte-level BPE tokenizer trained
here with the ``tokenizers`` library, a ChatML chat template and ``generation_config.json``. It is the embedded model
that ``vllm serve`` runs on machines without Trainium, and the model every test compares against Hugging Face.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# Defaults: small enough to build in about a second, yet every structural feature of Qwen3-30B-A3B is present
# (GQA, per-head q/k norm, routed experts with top-k > 1, renormalised routing). head_dim 64 because vLLM's CPU
# attention supports head sizes 32, 64, 80, ... only (../shared/research/cpu-setup.md, trap 3).
DEFAULT_CONFIG: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,  # dense MLP width, used by mlp_only_layers / decoder_sparse_step > 1
    "moe_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,  # Qwen3-30B-A3B's value
    "max_position_embeddings": 4096,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    # Wider than HF's 0.02 so that random logits and router scores are well separated: greedy parity tests then
    # compare decisions, not fp32 rounding noise between two correct implementations.
    "initializer_range": 0.2,
}

# make-tiny-model --arch: (transformers config class, config.json architecture)
ARCHS = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}
MOE_FIELDS = (
    "moe_intermediate_size",
    "num_experts",
    "num_experts_per_tok",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
)
# Dense defaults: the MoE defaults without the experts; Llama with Llama 3's rope_theta.
DENSE_DEFAULTS = {"qwen3": {}, "llama": {"rope_theta": 500_000.0}}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Training text for the tokenizer: enough English, code and digits that prompts split into a realistic mix of tokens.
_TOKENIZER_CORPUS = """\
On the first day of Christmas my true love sent to me a partridge in a pear tree.
A palindrome reads the same backward as forward: racecar, level, madam, noon, refer.
def is_palindrome(text): return text == text[::-1]
Five friends sit around a round table; Alice sits next to Bob, and Carol sits across from Dave.
"The only thing we have to fear is fear itself," said the president in 1933.
Find the needle in the haystack: the secret number is 42, hidden among 1000 lines of text.
Mixture-of-experts models route each token to a few experts out of many, trading memory for compute.
Trainium chips have tensor, vector, scalar and GpSimd engines fed from SBUF and PSUM memories.
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' "
"""


class TinyModelConfigError(ValueError):
    """A --config file or --arch that cannot describe a checkpoint."""


def _config_class(arch: str):
    import transformers

    if arch not in ARCHS:
        raise TinyModelConfigError(f"make-tiny-model: --arch {arch!r}; must be one of {', '.join(ARCHS)}")
    return getattr(transformers, ARCHS[arch][0])


def default_config(arch: str = "qwen3_moe") -> dict[str, Any]:
    """The tiny defaults of ``arch``."""
    _config_class(arch)
    if arch == "qwen3_moe":
        return dict(DEFAULT_CONFIG)
    return {k: v for k, v in DEFAULT_CONFIG.items() if k not in MOE_FIELDS} | DENSE_DEFAULTS[arch]


def known_config_fields(arch: str = "qwen3_moe") -> set[str]:
    """Field names the ``arch``'s transformers config accepts, including its aliases (e.g. ``num_experts``)."""
    from transformers import PretrainedConfig

    config_class = _config_class(arch)
    fields = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    fields |= set(getattr(config_class, "attribute_map", {}))
    fields |= set(inspect.signature(PretrainedConfig.__init__).parameters) - {"self", "kwargs"}
    # Written by transformers itself or read by vLLM from the JSON; accepted so a real config.json can be passed.
    fields |= {"rope_theta", "rope_scaling", "rope_parameters", "head_dim", "architectures", "torch_dtype", "dtype"}
    fields |= {"bos_token_id", "eos_token_id", "pad_token_id", "model_type", "transformers_version"}
    return fields


def load_config_overrides(path: str | Path, arch: str = "qwen3_moe") -> dict[str, Any]:
    """Read a JSON object of the arch's config fields; reject bad JSON and unknown fields with the file and field
    named."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise TinyModelConfigError(f"make-tiny-model: --config {path}: cannot read ({err.strerror})") from err
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as err:
        raise TinyModelConfigError(
            f"make-tiny-model: --config {path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from err
    if not isinstance(overrides, dict):
        raise TinyModelConfigError(
            f"make-tiny-model: --config {path}: expected a JSON object of Qwen3MoeConfig fields, "
            f"got {type(overrides).__name__}"
        )
    unknown = sorted(set(overrides) - known_config_fields(arch))
    if unknown:
        name = ARCHS[arch][0]
        raise TinyModelConfigError(
            f"make-tiny-model: --config {path}: unknown {name} field(s) {unknown}; "
            f"see transformers.{name} for the accepted names"
        )
    return overrides


def build_config(overrides: dict[str, Any] | None = None, vocab_size_min: int = 0, arch: str = "qwen3_moe"):
    """The tiny model's transformers config for ``arch``: its defaults updated with ``overrides``, checked."""
    config_class = _config_class(arch)
    fields = {**default_config(arch), **(overrides or {})}
    _check_config_fields(fields, vocab_size_min, moe=arch == "qwen3_moe")
    rope_theta = float(fields.pop("rope_theta"))
    rope_parameters = fields.pop("rope_parameters", None) or {"rope_type": "default", "rope_theta": rope_theta}
    rope_parameters.setdefault("rope_theta", rope_theta)
    config = config_class(**fields, rope_parameters=rope_parameters)
    config.architectures = [ARCHS[arch][1]]
    return config


def _check_config_fields(fields: dict[str, Any], vocab_size_min: int, moe: bool = True) -> None:
    def positive_int(name: str) -> int:
        value = fields.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise TinyModelConfigError(f"make-tiny-model: {name}={value!r}; must be a positive integer")
        return value

    for name in (
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "num_experts",
        "num_experts_per_tok",
        "decoder_sparse_step",
        "vocab_size",
        "max_position_embeddings",
    ):
        if moe or name not in MOE_FIELDS:
            positive_int(name)
    if fields["num_attention_heads"] % fields["num_key_value_heads"]:
        raise TinyModelConfigError(
            f"make-tiny-model: num_attention_heads={fields['num_attention_heads']}; must be a multiple of "
            f"num_key_value_heads={fields['num_key_value_heads']}"
        )
    if moe and fields["num_experts_per_tok"] > fields["num_experts"]:
        raise TinyModelConfigError(
            f"make-tiny-model: num_experts_per_tok={fields['num_experts_per_tok']}; must not exceed "
            f"num_experts={fields['num_experts']}"
        )
    if fields["vocab_size"] < vocab_size_min:
        raise TinyModelConfigError(
            f"make-tiny-model: vocab_size={fields['vocab_size']}; the tokenizer needs at least {vocab_size_min}"
        )
    bad_layers = [i for i in fields.get("mlp_only_layers") or [] if not 0 <= int(i) < fields["num_hidden_layers"]]
    if bad_layers:
        raise TinyModelConfigError(
            f"make-tiny-model: mlp_only_layers={fields['mlp_only_layers']}; layer indices must be in "
            f"[0, num_hidden_layers={fields['num_hidden_layers']})"
        )


def random_state_dict(config, seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights under the checkpoint names of Qwen/Qwen3-30B-A3B."""
    gen = torch.Generator().manual_seed(seed)
    std = config.initializer_range

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) * std

    def norm_weight(size: int) -> torch.Tensor:
        # Not all ones, so that a norm that forgets its weight fails the parity tests.
        return 1.0 + 0.1 * torch.randn(size, generator=gen)

    from vllm_nki_moe.models.config import read_sizes

    sizes = read_sizes(config, architecture=config.architectures[0])
    h, d = config.hidden_size, config.head_dim
    tensors = {"model.embed_tokens.weight": matrix(config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = norm_weight(h)
        tensors[f"{p}.post_attention_layernorm.weight"] = norm_weight(h)
        tensors[f"{p}.self_attn.q_proj.weight"] = matrix(config.num_attention_heads * d, h)
        tensors[f"{p}.self_attn.k_proj.weight"] = matrix(config.num_key_value_heads * d, h)
        tensors[f"{p}.self_attn.v_proj.weight"] = matrix(config.num_key_value_heads * d, h)
        tensors[f"{p}.self_attn.o_proj.weight"] = matrix(h, config.num_attention_heads * d)
        if sizes.qk_norm:
            tensors[f"{p}.self_attn.q_norm.weight"] = norm_weight(d)
            tensors[f"{p}.self_attn.k_norm.weight"] = norm_weight(d)
        if sizes.is_moe_layer(i):
            tensors[f"{p}.mlp.gate.weight"] = matrix(config.num_experts, h)
            inter = config.moe_intermediate_size
            for e in range(config.num_experts):
                tensors[f"{p}.mlp.experts.{e}.gate_proj.weight"] = matrix(inter, h)
                tensors[f"{p}.mlp.experts.{e}.up_proj.weight"] = matrix(inter, h)
                tensors[f"{p}.mlp.experts.{e}.down_proj.weight"] = matrix(h, inter)
        else:
            inter = config.intermediate_size
            tensors[f"{p}.mlp.gate_proj.weight"] = matrix(inter, h)
            tensors[f"{p}.mlp.up_proj.weight"] = matrix(inter, h)
            tensors[f"{p}.mlp.down_proj.weight"] = matrix(h, inter)
    tensors["model.norm.weight"] = norm_weight(h)
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = matrix(config.vocab_size, h)
    return tensors


# The tensors Qwen's FP8 checkpoints store in float8_e4m3fn (with `.weight_scale_inv`): the attention projections
# and the (dense or expert) MLP matrices; embeddings, norms, the router gate and the LM head stay unquantized.
FP8_TENSOR = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)\.weight$")


def quantize_fp8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every ``FP8_TENSOR`` as block-scaled FP8 (``ops.fp8.quantize``) plus its ``weight_scale_inv``.

    Each quantized dimension must be at most one block or a whole number of blocks: the published checkpoints' sizes
    all are, and transformers' dequantization derives the block from the scale grid (rows // scale rows), which only
    agrees with the 128 x 128 blocks for such sizes."""
    from vllm_nki_moe.ops import fp8

    out = {}
    for name, tensor in tensors.items():
        if not FP8_TENSOR.search(name):
            out[name] = tensor
            continue
        for dim in tensor.shape:
            if dim > fp8.BLOCK and dim % fp8.BLOCK:
                raise TinyModelConfigError(
                    f"make-tiny-model --fp8: {name} has shape {tuple(tensor.shape)}; each dimension must be at most "
                    f"{fp8.BLOCK} or a multiple of it (128 x 128 scale blocks)"
                )
        out[name], out[f"{name}_scale_inv"] = fp8.quantize(tensor)
    return out


def train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a built-in corpus, with Qwen's special tokens and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TOKENIZER_CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    out_dir: str | Path,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    arch: str = "qwen3_moe",
    fp8: bool = False,
) -> Path:
    """Write the ``arch`` checkpoint to ``out_dir`` (created if needed) and return its path; ``fp8``: in the format
    of Qwen's FP8 checkpoints (``quantize_fp8``, ``quantization_config``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = int((overrides or {}).get("vocab_size", DEFAULT_CONFIG["vocab_size"]))
    tokenizer = train_tokenizer(vocab_size)
    # The BPE trainer may stop short of vocab_size; the embedding rows beyond the tokenizer are simply never used.
    config = build_config(overrides, vocab_size_min=len(tokenizer), arch=arch)
    endoftext, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    config.bos_token_id = endoftext
    config.eos_token_id = im_end
    config.pad_token_id = endoftext
    config.dtype = "float32"
    tensors = random_state_dict(config, seed)
    if fp8:
        from vllm_nki_moe.models.config import FP8_SCHEME

        tensors = quantize_fp8(tensors)
        config.quantization_config = dict(FP8_SCHEME)

    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    generation_config = {
        "bos_token_id": endoftext,
        "eos_token_id": [im_end, endoftext],
        "pad_token_id": endoftext,
        "do_sample": False,  # a test model: greedy unless the request says otherwise
    }
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    return out
