"""How Hugging Face Qwen3-MoE checkpoint tensors map onto this plugin's parameters.

Parameter names equal checkpoint names except where tensors are fused for speed; those fusions are this one table.
"""

from __future__ import annotations

import re

# (fused parameter, checkpoint piece, shard id): q/k/v into qkv_proj, a dense MLP's gate/up into gate_up_proj.
STACKED_PARAMS: tuple[tuple[str, str, str | int], ...] = (
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
)

# Per-expert checkpoint tensors (`mlp.experts.<e>.<proj>.weight`) go into the experts' stacked tensors:
# gate and up rows into w13 (gate first), down into w2; an FP8 checkpoint's `.weight_scale_inv` likewise into
# w13_weight_scale_inv / w2_weight_scale_inv.
EXPERT_WEIGHT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
    r"\.(?P<tensor>weight|weight_scale_inv)$"
)
EXPERT_TARGETS = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", None)}

# Checkpoint tensors the model does not use (rotary caches some exporters write).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
