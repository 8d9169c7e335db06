"""``vllm-nki-moe export-contest OUT.py``: our kernels as one drop-in ``qwen_with_nki.py`` for the nki-moe harness.

The harness (``aws-neuron/nki-moe`` at f742418, ``main.py``) imports the submission as ``qwen_with_nki``
(``--enable-nki``) or by ``--qwen NAME``, and uses exactly one name from it, ``NeuronQwen3MoeForCausalLM``:
``get_neuron_config_cls()``, ``get_config_cls()``, ``cls(model_path, config)``, ``.compile(path, debug=...)``,
``.load(path)`` (``prepare_inference``); the submission must be one Python file (README, "Submission guidelines").
The written module therefore:

- subclasses NxDI's stock Qwen3-MoE (``neuronx_distributed_inference.models.qwen3_moe.modeling_qwen3_moe``, what
  ``main.py`` uses as its baseline), replacing modules where one of our kernels plugs in (:data:`HOOKS`) and inheriting
  everything else (config, weight conversion, compiler arguments), instead of copying the ~600-line model file;
- embeds the source of every kernel file in ``kernels/`` at export time, byte for byte with its sha256 (the harness
  takes one file), and on first use writes them as real source files into the package ``<module>_kernels`` beside
  itself and imports them from there: the files' ``from .limits import ...`` lines work unchanged, and ``nki.jit``
  reads each kernel's source from its file as it would in any package;
- falls back to NxDI's own layers under ``neuronx_distributed.utils.cpu_mode()``, as the harness's ``qwen_with_nki.py``
  does (its ``get_rmsnorm_cls``), so the module imports and runs on CPU without ``nki``;
- imports nothing from ``vllm_nki_moe``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import subprocess
from dataclasses import dataclass
from pathlib import Path

HARNESS = "aws-neuron/nki-moe@f742418 (main.py, qwen_with_nki.py)"
HARNESS_ENTRY_POINT = "NeuronQwen3MoeForCausalLM"  # the one name main.py takes from the submission module


@dataclass(frozen=True)
class Hook:
    """Where one of our kernels replaces a module of NxDI's Qwen3-MoE in the written file."""

    name: str
    file: str  # kernel file stem in kernels/
    kernel: str  # the @nki.jit function
    positional: tuple[str, ...]  # how the written module calls it
    replaces: str  # for the written module's docstring


HOOKS = (
    Hook(
        name="rmsnorm",
        file="rmsnorm",
        kernel="rms_norm",
        positional=("x", "weight", "eps"),
        replaces="every RMSNorm (input, post-attention unless NxDI's fused MoE kernel owns it, per-head q/k, final)",
    ),
    Hook(
        name="rope",
        file="rope",
        kernel="rope",
        positional=("q", "k", "positions", "cos_sin_cache"),
        replaces="each attention's RoPE (NxDI's apply_rotary_embedding on its own cos/sin), where it computes what "
        "NxDI's does (not the polar-compatible form)",
    ),
    Hook(
        name="attention_prefill",
        file="attention_prefill",
        kernel="attention_prefill",
        positional=("q", "k", "v", "k_cache", "v_cache", "slot_mapping", "scale"),
        replaces="each attention's context encoding where NxDI runs its native-compiler path (perform_prefill with no "
        "flash kernel strategy, right padding), one sequence per call (attention_hook_applies)",
    ),
    Hook(
        name="attention_decode",
        file="attention_decode",
        kernel="attention_decode",
        positional=("q", "k", "v", "k_cache", "v_cache", "slot_mapping", "block_tables", "context_lens", "scale"),
        replaces="each attention's token generation (compute_for_token_gen: prior KV cache [B, Hkv, S, D] plus the "
        "new token), read in place from NxDI's own cache (attention_hook_applies)",
    ),
    Hook(
        name="router",
        file="router",
        kernel="router_topk_matmul",
        positional=("x", "gate_weight_t", "top_k", "renormalize"),
        replaces="each MoE layer's router (NxD's RouterTopK: logits, softmax over the experts, top-k), where it "
        "computes what RouterTopK does (router_hook_applies)",
    ),
    Hook(
        name="moe_decode",
        file="moe_nxdi",
        kernel="moe_decode_nxdi",
        positional=("hidden", "gate_up", "down", "topk_weights", "topk_ids"),
        replaces="each MoE layer's routed experts at token generation (NxD's ExpertMLPsV2 with seq_len 1, on its own "
        "gate_up/down weights), where it computes what ExpertMLPsV2 does (moe_experts_hook_applies)",
    ),
    Hook(
        name="moe_prefill",
        file="moe_prefill",
        kernel="moe_prefill_nxdi",
        positional=("hidden", "gate_up", "down", "block_expert", "block_tokens", "block_weights", "num_blocks"),
        replaces="each MoE layer's routed experts at context encoding (NxD's ExpertMLPsV2 with seq_len > 1 and no "
        "capacity factor, on its own weights; blocks of tokens per expert built in the graph), where it computes "
        "what ExpertMLPsV2 does (moe_experts_hook_applies)",
    ),
)


class ExportError(ValueError):
    pass


def kernels_dir() -> Path:
    """The installed ``vllm_nki_moe.kernels`` folder (the repository's ``kernels/``), located without importing it."""
    spec = importlib.util.find_spec("vllm_nki_moe.kernels")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("export-contest: package vllm_nki_moe.kernels not found; reinstall vllm-nki-moe")
    return Path(list(spec.submodule_search_locations)[0])


def _relative_imports(stem: str, source: str) -> set[str]:
    """Sibling kernel files ``source`` imports (``from .x import``, ``from . import x``); project imports fail."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=f"kernels/{stem}.py")):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            raise ExportError(f"export-contest: kernels/{stem}.py imports from outside kernels/ (level {node.level})")
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        module = node.module if isinstance(node, ast.ImportFrom) and node.level == 0 else None
        if any(n.split(".")[0] == "vllm_nki_moe" for n in [*names, module or ""]):
            raise ExportError(f"export-contest: kernels/{stem}.py imports vllm_nki_moe; the drop-in must not")
    return found


def _load_order(sources: dict[str, str]) -> list[str]:
    deps = {stem: _relative_imports(stem, src) for stem, src in sources.items()}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(stem: str) -> None:
        if stem in order:
            return
        if stem in visiting:
            raise ExportError(f"export-contest: import cycle among kernel files through kernels/{stem}.py")
        if stem not in sources:
            raise ExportError(f"export-contest: a kernel file imports kernels/{stem}.py, which does not exist")
        visiting.add(stem)
        for dep in sorted(deps[stem]):
            visit(dep)
        visiting.discard(stem)
        order.append(stem)

    for stem in sorted(sources):
        visit(stem)
    return order


def _hook_status(hook: Hook, sources: dict[str, str]) -> str | None:
    """None when ``hook`` can be wired, else why not (reported by the CLI; the NxDI module then stays)."""
    source = sources.get(hook.file)
    if source is None:
        return f"kernels/{hook.file}.py is not present"
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == hook.kernel:
            names = tuple(a.arg for a in node.args.posonlyargs + node.args.args)
            if names[: len(hook.positional)] != hook.positional:
                return f"{hook.file}.{hook.kernel}{names} does not take {hook.positional} first"
            return None
    return f"kernels/{hook.file}.py defines no {hook.kernel}"


def _git_commit(path: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    kernel_files: tuple[str, ...]
    hooks: dict[str, str | None]  # hook name -> None (wired) or the reason it is not


HOOK_NAMES = tuple(hook.name for hook in HOOKS)


def selected_hooks(only: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> dict[str, str | None]:
    """Hook name -> None (selected) or why the user left it out (``--only`` / ``--skip``, for bisecting an accuracy
    failure one wiring at a time); a name that is no hook is an error naming the hooks there are."""
    for flag, names in (("--only", only), ("--skip", skip)):
        unknown = [name for name in names if name not in HOOK_NAMES]
        if unknown:
            raise ExportError(f"export-contest {flag}: no hook {', '.join(map(repr, unknown))}; hooks: {HOOK_NAMES}")
    if only and skip:
        raise ExportError("export-contest: --only and --skip together; give one")
    return {
        name: "left out by --skip" if name in skip else "left out by --only" if only and name not in only else None
        for name in HOOK_NAMES
    }


def render(
    kdir: Path | None = None, only: tuple[str, ...] = (), skip: tuple[str, ...] = ()
) -> tuple[str, ExportResult]:
    """The text of the module and what went into it (``path`` in the result is unset: ``Path()``); ``only`` /
    ``skip``: hook names to wire exclusively / to leave to NxDI (:func:`selected_hooks`)."""
    from vllm_nki_moe import __version__

    chosen = selected_hooks(only, skip)
    kdir = kdir or kernels_dir()
    files = sorted(p for p in kdir.glob("*.py") if p.name != "__init__.py")
    sources = {p.stem: p.read_text() for p in files}
    if "limits" not in sources:
        raise ExportError(f"export-contest: {kdir}/limits.py not found; the kernels import it")
    order = _load_order(sources)
    hooks = {hook.name: chosen[hook.name] or _hook_status(hook, sources) for hook in HOOKS}
    wired = {h.name: (h.file, h.kernel) for h in HOOKS if hooks[h.name] is None}
    digests = {stem: hashlib.sha256(src.encode()).hexdigest() for stem, src in sources.items()}
    hook_lines = "\n".join(
        f"- {h.name}: kernels/{h.file}.py {h.kernel}, replacing {h.replaces}"
        if hooks[h.name] is None
        else f"- {h.name}: not wired ({hooks[h.name]}); NxDI's module runs"
        for h in HOOKS
    )
    file_lines = "\n".join(f"- kernels/{stem}.py sha256 {digests[stem]}" for stem in sorted(sources))
    text = _TEMPLATE.format(
        version=__version__,
        commit=_git_commit(kdir),
        harness=HARNESS,
        hook_lines=hook_lines,
        file_lines=file_lines,
        sources=_literal(sources),
        digests=_literal(digests),
        order=repr(tuple(order)),
        hooks=repr(wired),
    )
    compile(text, "qwen_with_nki.py", "exec")  # a syntax error here is ours, not the harness's
    return text, ExportResult(path=Path(), kernel_files=tuple(sorted(sources)), hooks=hooks)


def _literal(mapping: dict[str, str]) -> str:
    lines = ["{"]
    lines += [f"    {key!r}: {value!r}," for key, value in sorted(mapping.items())]
    lines.append("}")
    return "\n".join(lines)


def export_contest(
    out: str | Path, kdir: Path | None = None, only: tuple[str, ...] = (), skip: tuple[str, ...] = ()
) -> ExportResult:
    """Write the drop-in module to ``out`` (a ``.py`` file; its stem is the module name the harness imports) with the
    hooks ``only`` / ``skip`` select (:func:`selected_hooks`)."""
    out = Path(out)
    if out.suffix != ".py":
        raise ExportError(f"export-contest: OUT={str(out)!r}; must be a .py file (main.py imports it by module name)")
    text, result = render(kdir, only, skip)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return ExportResult(path=out, kernel_files=result.kernel_files, hooks=result.hooks)


_TEMPLATE = '''\
"""Qwen3-30B-A3B with vllm-nki-moe's NKI kernels, a drop-in for the nki-moe harness's qwen_with_nki.py.

Generated by `vllm-nki-moe export-contest` from vllm-nki-moe {version} (git {commit}); regenerate, do not edit.
Harness: {harness}. main.py uses NeuronQwen3MoeForCausalLM from this module: get_neuron_config_cls(),
get_config_cls(), NeuronQwen3MoeForCausalLM(model_path, config), compile(path), load(path).

The model is NxDI's stock Qwen3-MoE (neuronx_distributed_inference.models.qwen3_moe.modeling_qwen3_moe), subclassed;
our kernels replace these modules on device:
{hook_lines}
Under neuronx_distributed.utils.cpu_mode() NxDI's own layers run. Embedded kernel files, written on first use as
real source files into the package <this module>_kernels beside this file (or under the temporary directory when
this folder is read-only) and imported from there:
{file_lines}
"""

import hashlib
import importlib
import os
import sys
import tempfile

import torch
from neuronx_distributed.modules.moe.expert_mlps_v2 import ExpertMLPsV2
from neuronx_distributed.modules.moe.routing import RouterTopK
from neuronx_distributed.utils import cpu_mode
from neuronx_distributed_inference.models.qwen3_moe import modeling_qwen3_moe as _nxdi
from torch import nn

KERNEL_FILES = {sources}
KERNEL_SHA256 = {digests}
KERNEL_LOAD_ORDER = {order}
# Wired hooks: name -> (kernel file, @nki.jit function).
HOOKS = {hooks}
KERNEL_PACKAGE = __name__ + "_kernels"

Qwen3MoeInferenceConfig = _nxdi.Qwen3MoeInferenceConfig


def kernel_folder():
    """Where the kernel files are written as real source (nki.jit reads a kernel's source from its file): the folder
    KERNEL_PACKAGE beside this module, or under the temporary directory when this module's folder is read-only."""
    here = os.path.dirname(os.path.abspath(__file__))
    if os.access(here, os.W_OK):
        return os.path.join(here, KERNEL_PACKAGE)
    digest = hashlib.sha256("".join(KERNEL_SHA256[s] for s in KERNEL_LOAD_ORDER).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"{{KERNEL_PACKAGE}}-{{digest}}", KERNEL_PACKAGE)


def write_kernel_files(folder):
    """The embedded kernel files written into ``folder`` as the package KERNEL_PACKAGE, byte for byte; a file that
    differs (an older export, an edit) is rewritten: this module's copy is the submission."""
    os.makedirs(folder, exist_ok=True)
    for stem, source in [("__init__", "")] + [(s, KERNEL_FILES[s]) for s in KERNEL_LOAD_ORDER]:
        if stem != "__init__" and hashlib.sha256(source.encode()).hexdigest() != KERNEL_SHA256[stem]:
            raise ImportError(f"{{__name__}}: embedded kernels/{{stem}}.py was edited; regenerate this file")
        path = os.path.join(folder, stem + ".py")
        if not os.path.exists(path) or open(path, encoding="utf-8").read() != source:
            with open(path, "w", encoding="utf-8") as f:
                f.write(source)


def load_kernels():
    """The kernel files as the package KERNEL_PACKAGE, imported from real source files (imports nki; only called on
    device)."""
    package = sys.modules.get(KERNEL_PACKAGE)
    if package is not None:
        return package
    folder = kernel_folder()
    write_kernel_files(folder)
    parent = os.path.dirname(folder)
    sys.path.insert(0, parent)
    try:
        package = importlib.import_module(KERNEL_PACKAGE)
        for stem in KERNEL_LOAD_ORDER:
            setattr(package, stem, importlib.import_module(f"{{KERNEL_PACKAGE}}.{{stem}}"))
    except BaseException:
        for name in [m for m in sys.modules if m == KERNEL_PACKAGE or m.startswith(KERNEL_PACKAGE + ".")]:
            del sys.modules[name]
        raise
    finally:
        sys.path.remove(parent)
    return package


def kernel(hook):
    file, function = HOOKS[hook]
    return getattr(getattr(load_kernels(), file), function)


class NkiRMSNorm(nn.Module):
    """RMSNorm over the last axis by the rms_norm kernel, rounded as NxDI's CustomRMSNorm rounds
    (modules/custom_calls.py: fp32 in, one cast to the input dtype); parameter and attribute names as its."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.hidden_size = hidden_size
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, hidden_states):
        shape = hidden_states.shape
        # rounded once, at the end, as NxDI's CustomRMSNorm (fp32 RmsNorm, cast to the input dtype): on trn3 the
        # harness compares logits with NxDI's on the same device
        x = hidden_states.reshape(-1, shape[-1])
        out = kernel("rmsnorm")(x, self.weight.view(-1), self.variance_epsilon, "auto", False)
        return out.reshape(shape)


def get_rmsnorm_cls():
    """NxDI's choice under cpu_mode() or when the rmsnorm hook is not wired, else NkiRMSNorm."""
    if cpu_mode() or "rmsnorm" not in HOOKS:
        return _nxdi.get_rmsnorm_cls()
    return NkiRMSNorm


def _swap_norms(layer, config):
    norm = get_rmsnorm_cls()
    layer.input_layernorm = norm(config.hidden_size, eps=config.rms_norm_eps)
    if not getattr(layer, "moe_fused_nki_kernel_enabled", False):  # else NxDI's fused MoE kernel holds this norm
        layer.post_attention_layernorm = norm(config.hidden_size, eps=config.rms_norm_eps)
    layer.self_attn.q_layernorm = norm(config.head_dim, config.rms_norm_eps)
    layer.self_attn.k_layernorm = norm(config.head_dim, config.rms_norm_eps)


class NkiRopeAttention(_nxdi.NeuronQwen3MoEAttention):
    """NxDI's Qwen3-MoE attention with RoPE in the rope kernel: apply_rotary_embedding (attention_base.py) on
    Q [B, Hq, S, D] and K [B, Hk, S, D] with NxDI's own cos/sin [B, S, D] (RotaryEmbedding, in x's dtype), each
    token's (cos, sin) halves one row of the kernel's table; the polar-compatible form stays NxDI's."""

    def apply_rotary_embedding(self, Q, K, V, position_ids, cos_cache, sin_cache, use_polar_compatible_rope):
        if use_polar_compatible_rope or self.rotary_emb is None:
            return super().apply_rotary_embedding(
                Q, K, V, position_ids, cos_cache, sin_cache, use_polar_compatible_rope
            )
        if cos_cache is None or sin_cache is None:
            cos_cache, sin_cache = self.rotary_emb(V, position_ids)
        B, Hq, S, D = Q.shape
        Hk, half = K.shape[1], D // 2
        # cos = cat(freqs, freqs).cos(): the first half of each row is the whole table row
        table = torch.cat([cos_cache[..., :half], sin_cache[..., :half]], dim=-1).reshape(B * S, D).float()
        rows = torch.arange(B * S, dtype=torch.int32, device=Q.device)
        q = Q.transpose(1, 2).reshape(B * S, Hq * D)
        k = K.transpose(1, 2).reshape(B * S, Hk * D)
        q, k = kernel("rope")(q, k, rows, table)
        Q = q.reshape(B, S, Hq, D).transpose(1, 2)
        K = k.reshape(B, S, Hk, D).transpose(1, 2)
        return Q, K, cos_cache, sin_cache


class NkiCoreAttention(_nxdi.NeuronQwen3MoEAttention):
    """NxDI's Qwen3-MoE attention with softmax(Q K^T / sqrt(D)) V in our kernels: context encoding (perform_prefill,
    where NxDI would run its native-compiler path) by attention_prefill, one sequence per call; token generation
    (compute_for_token_gen) by attention_decode on NxDI's own KV cache. Q [B, Hq, S, D], K, V [B, Hkv, S, D]; outputs
    as NxDI's ([B, Hq, S, D]). Anything else (speculation, prefix caching, a flash-kernel strategy, a quantized
    cache) stays NxDI's."""

    def perform_prefill(self, Q, K, V, q_len, bsz, attention_mask):
        strategy = self.get_flash_attention_strategy(q_len, attention_mask is not None)
        B, Hq, S, D = Q.shape
        if (
            "attention_prefill" not in HOOKS
            or strategy.name != "NONE"
            or not (Q.dtype == K.dtype == V.dtype)
            or D > load_kernels().attention_prefill.MAX_HEAD_DIM  # head_dim on the partitions
        ):
            return super().perform_prefill(Q, K, V, q_len, bsz, attention_mask)
        Hk = K.shape[1]
        # Right padding (attention_hook_applies): a real token's keys are all real, so NxDI's mask (causal and
        # padding) is the causal mask on its rows; padding rows are computed and never read. The kernel writes no
        # cache here (every slot negative into a one-slot scratch cache): NxDI's KV cache manager writes K/V.
        scratch = torch.zeros(1, Hk, 1, D, dtype=K.dtype, device=K.device)
        no_slots = torch.full((S,), -1, dtype=torch.int32, device=K.device)
        scale = 1.0 / self.softmax_scale  # NxDI divides the scores by softmax_scale = sqrt(D)
        rows = []
        for b in range(B):
            q = Q[b].transpose(0, 1).reshape(S, Hq * D)
            k = K[b].transpose(0, 1).reshape(S, Hk * D)
            v = V[b].transpose(0, 1).reshape(S, Hk * D)
            out, _, _ = kernel("attention_prefill")(q, k, v, scratch, scratch.clone(), no_slots, scale)
            rows.append(out.reshape(S, Hq, D).transpose(0, 1))
        return torch.stack(rows), strategy

    def compute_for_token_gen(
        self, Q, K, V, position_ids, past_key_value, attention_mask, active_mask, is_prefix_caching=False
    ):
        k_prior, v_prior = past_key_value[0], past_key_value[1]
        B, Hq, q_len, D = Q.shape
        Hk, S = k_prior.shape[1], k_prior.shape[2]
        block = decode_block_size(S, D, k_prior.dtype)
        speculation = position_ids is not None and position_ids.shape[-1] > 1
        if (
            "attention_decode" not in HOOKS
            or is_prefix_caching
            or speculation
            or q_len != 1
            or block is None
            or D > load_kernels().attention_prefill.MAX_HEAD_DIM  # head_dim on the partitions
            or Hq // Hk > load_kernels().attention_decode.MAX_QUERY_GROUP  # query heads per kv head on partitions
            or tuple(k_prior.shape) != (B, Hk, S, D)
            or tuple(v_prior.shape) != (B, Hk, S, D)
            or not (Q.dtype == K.dtype == V.dtype == k_prior.dtype == v_prior.dtype)
        ):
            return super().compute_for_token_gen(
                Q, K, V, position_ids, past_key_value, attention_mask, active_mask, is_prefix_caching
            )
        # Each (sequence b, kv head g) of NxDI's cache [B, Hkv, S, D] is one kernel sequence with one kv head: its S
        # positions are S / block contiguous cache blocks, so the kernel's paged cache [NB, 1, block, D] is NxDI's
        # cache reshaped (no copy). attention_mask is True where i < the computed context length L_b
        # (compute_for_token_gen's contract); the new token goes to slot L_b, where NxDI's KV cache manager writes
        # the same K/V after the layer, and the kernel attends over L_b + 1 tokens: NxDI's prior + active parts.
        rows, blocks = B * Hk, S // block
        lengths = attention_mask[:, 0, -1, :].sum(dim=-1, dtype=torch.int32)  # [B] computed context lengths
        lengths = lengths.repeat_interleave(Hk)
        sequence = torch.arange(rows, dtype=torch.int32, device=Q.device)
        block_tables = sequence[:, None] * blocks + torch.arange(blocks, dtype=torch.int32, device=Q.device)
        out, _, _ = kernel("attention_decode")(
            Q.reshape(rows, (Hq // Hk) * D),
            K.reshape(rows, D),
            V.reshape(rows, D),
            k_prior.reshape(rows * blocks, 1, block, D),
            v_prior.reshape(rows * blocks, 1, block, D),
            sequence * S + lengths,  # int32, as the kernel takes slots, tables and lengths
            block_tables,
            lengths + 1,
            1.0 / self.softmax_scale,
        )
        return out.reshape(B, Hq, 1, D)


def decode_block_size(S, D, dtype):
    """The cache block the decode kernel reads NxDI's cache in: the largest power of two dividing S whose K and V
    tiles fit the kernel's SBUF budget (attention_decode.KV_TILE_SBUF_BYTES); None: none does."""
    budget = load_kernels().attention_decode.KV_TILE_SBUF_BYTES
    itemsize = torch.empty((), dtype=dtype).element_size()
    block = S & -S  # the largest power of two dividing S
    while block >= 1 and 2 * block * D * itemsize > budget:
        block //= 2
    return block if block >= 1 else None


class NkiRopeCoreAttention(NkiRopeAttention, NkiCoreAttention):
    """Both hooks on one attention: RoPE and the attention core in our kernels."""


def attention_hook_applies(attention):
    """Whether NkiCoreAttention computes what this attention does where it takes over: no context or attention data
    parallelism, flash decoding, transposed K cache, sliding window, chunked attention or learned sinks; right
    padding; sizes and dtypes the kernels take. (Per call it also leaves speculation, prefix caching and
    flash-kernel strategies to NxDI.)"""
    heads, kv_heads = getattr(attention, "num_heads", 0), getattr(attention, "num_key_value_heads", 0)
    return (
        ("attention_prefill" in HOOKS or "attention_decode" in HOOKS)
        and getattr(attention, "cp_degree", 1) == 1
        and getattr(attention, "dp_degree", 1) == 1
        and not getattr(attention, "flash_decoding_enabled", False)
        and not getattr(attention, "k_cache_transposed", False)
        and getattr(attention, "sliding_window", None) is None
        and not getattr(attention, "attention_chunk_size", None)
        and getattr(attention, "learned_sinks_size", None) is None
        and getattr(attention, "padding_side", "right") == "right"
        and kv_heads >= 1
        and heads % kv_heads == 0
        and getattr(attention, "torch_dtype", torch.bfloat16) in (torch.bfloat16, torch.float32)
    )


def _swap_attention(layer):
    attention = getattr(layer, "self_attn", None)
    if type(attention) is not _nxdi.NeuronQwen3MoEAttention:
        return
    rope = "rope" in HOOKS and attention.head_dim % 2 == 0
    core = attention_hook_applies(attention)
    # the same module and parameters; only the replaced methods change
    if rope and core:
        attention.__class__ = NkiRopeCoreAttention
    elif rope:
        attention.__class__ = NkiRopeAttention
    elif core:
        attention.__class__ = NkiCoreAttention


ROUTER_MAX_EXPERTS = 512  # router_topk_matmul: the logits of a token tile are one PSUM bank
ROUTER_MAX_TOP_K = 8  # max8


class NkiRouterTopK(RouterTopK):
    """NxD's RouterTopK with the logits, the softmax over the experts and the top-k in the router_topk_matmul kernel
    (logits and softmax in fp32; NxD takes the softmax in fp64). Returns RouterTopK's triple but for two things the
    MoE does not read: router_logits is None (the hook is not wired where the MoE returns logits), and
    expert_affinities holds the softmax values of the chosen experts only (ExpertMLPsV2 masks every other entry,
    expert_mlps_v2.py get_expert_affinities_masked, and renormalises the chosen ones itself)."""

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1]).to(self.linear_router.weight.dtype)
        weights, index = kernel("router")(x, self.linear_router.weight.t(), self.top_k, False)
        index = index.to(torch.long)
        affinities = torch.zeros(x.shape[0], self.num_experts, dtype=weights.dtype, device=weights.device)
        affinities = affinities.scatter(1, index, weights)
        return None, affinities.to(hidden_states.dtype), index


def router_hook_applies(router, config):
    """Whether NkiRouterTopK computes what this RouterTopK does: softmax over all experts, no bias, no sequence
    parallelism in the router, logits not returned by the MoE, and sizes and dtypes the kernel takes."""
    neuron_config = getattr(config, "neuron_config", None)
    return (
        "router" in HOOKS
        and type(router) is RouterTopK
        and router.act_fn == "softmax"
        and not router.apply_act_fn_over_topk
        and router.linear_router.bias is None
        and not router.sequence_parallel_enabled
        and not getattr(neuron_config, "return_router_logits", False)
        and router.hidden_size % 128 == 0
        and router.num_experts <= ROUTER_MAX_EXPERTS
        and router.top_k <= min(ROUTER_MAX_TOP_K, router.num_experts)
        and router.linear_router.weight.dtype in (torch.float32, torch.bfloat16)
    )


def _swap_router(layer, config):
    router = getattr(getattr(layer, "mlp", None), "router", None)
    if router is not None and router_hook_applies(router, config):
        # The same module, parameters and hooks (the checkpoint's linear_router.weight, NxDI's fused decode kernel's
        # reference to this router); only forward changes.
        router.__class__ = NkiRouterTopK


MOE_DECODE_MAX_TOKENS = 128  # moe_decode_nxdi: tokens on one partition tile
_CLAMPS = ("gate_clamp_upper_limit", "gate_clamp_lower_limit", "up_clamp_upper_limit", "up_clamp_lower_limit")


class NkiExpertMLPsV2(ExpertMLPsV2):
    """NxD's ExpertMLPsV2 with token generation (seq_len 1, up to 128 tokens: moe_decode_nxdi) and dropless context
    encoding (no capacity factor: the blockwise moe_prefill_nxdi) in our kernels, on NxD's own gate_up_proj /
    down_proj weights; anything else stays NxD's. The chosen experts' affinities are normalised as NxD normalises
    them (F.normalize, p=1). Context encoding computes the bucket's padding tokens too (NxD masks them out of the
    blocks): their rows are never read back."""

    def forward(self, hidden_states, expert_affinities, expert_index, seq_len, padding_mask=None, **kwargs):
        decode = seq_len == 1
        if decode:
            ours = "moe_decode" in HOOKS and hidden_states.shape[0] <= MOE_DECODE_MAX_TOKENS
        else:
            ours = "moe_prefill" in HOOKS and self.routed_experts_mlp_config.capacity_factor is None
        ours = ours and not self.training
        if not ours:
            return super().forward(hidden_states, expert_affinities, expert_index, seq_len, padding_mask, **kwargs)
        chosen = expert_affinities.gather(1, expert_index).float()
        if self.routed_experts_mlp_config.normalize_top_k_affinities:
            chosen = chosen / chosen.sum(dim=1, keepdim=True)
        mlp_op = self.get_mlp_op()
        weights = (mlp_op.gate_up_proj.weight, mlp_op.down_proj.weight)
        if decode:
            return kernel("moe_decode")(hidden_states, *weights, chosen, expert_index.to(torch.int32))
        experts = self.routed_experts_mlp_config.num_experts
        blocks = load_kernels().moe_prefill.prefill_block_metadata(expert_index, chosen, experts)  # graph ops
        return kernel("moe_prefill")(hidden_states, *weights, *blocks)


def moe_experts_hook_applies(expert_mlps):
    """Whether NkiExpertMLPsV2 computes what this ExpertMLPsV2 does where its forward takes over: GLU with silu, no
    bias, scaling, clamping, shuffled dims, early affinity modulation, expert parallelism, sequence parallelism or
    quantization scales, and sizes and dtypes the kernels take."""
    cfg = expert_mlps.routed_experts_mlp_config
    gate_up = expert_mlps.get_mlp_op().gate_up_proj
    return (
        ("moe_decode" in HOOKS or "moe_prefill" in HOOKS)
        and type(expert_mlps) is ExpertMLPsV2
        and cfg.glu_mlp
        and cfg.hidden_act == "silu"
        and str(getattr(cfg.glu_type, "value", cfg.glu_type)).lower() == "glu"
        and not cfg.bias
        and cfg.hidden_act_scaling_factor == 1.0
        and cfg.hidden_act_bias == 0.0
        and all(getattr(cfg, name, None) is None for name in _CLAMPS)
        and not getattr(cfg, "early_expert_affinity_modulation", False)
        and not getattr(cfg, "is_hidden_dim_shuffled", False)
        and not getattr(cfg, "is_intermediate_dim_shuffled", False)
        and not expert_mlps.sequence_parallel_enabled
        and expert_mlps.moe_expert_model_parallel_group.size() == 1
        and getattr(gate_up, "scale", None) is None
        and cfg.hidden_size % 128 == 0
        and gate_up.weight.dtype in (torch.bfloat16, torch.float32)
    )


def _swap_experts(layer):
    experts = getattr(getattr(layer, "mlp", None), "expert_mlps", None)
    if experts is not None and moe_experts_hook_applies(experts):
        experts.__class__ = NkiExpertMLPsV2  # the same module and weights; only forward changes


class NeuronQwen3MoeModel(_nxdi.NeuronQwen3MoeModel):
    """NxDI's traced Qwen3-MoE body with our kernels' modules swapped in after it is built."""

    def init_model(self, config):
        super().init_model(config)
        if cpu_mode():
            return
        for layer in self.layers:
            _swap_attention(layer)
            _swap_router(layer, config)
            _swap_experts(layer)
        if get_rmsnorm_cls() is NkiRMSNorm:
            for layer in self.layers:
                _swap_norms(layer, config)
            self.norm = NkiRMSNorm(self.hidden_size, eps=config.rms_norm_eps)


class NeuronQwen3MoeForCausalLM(_nxdi.NeuronQwen3MoeForCausalLM):
    """The class main.py builds, compiles and benchmarks; everything but the model body is NxDI's."""

    _model_cls = NeuronQwen3MoeModel
'''
