"""``vllm-nki-moe export-contest``: the written qwen_with_nki.py imports against fakes of the nki-moe harness's imports
(tests/fakes/nki_moe_harness), exposes what main.py uses, and carries our kernels byte for byte."""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
from types import SimpleNamespace

import pytest
import torch

from tests import fakes
from vllm_nki_moe.tools import cli
from vllm_nki_moe.tools.contest_export import ExportError, export_contest, kernels_dir
from vllm_nki_moe.tools.kernel_check.tolerances import tolerance_for

MODULE = "qwen_with_nki"  # the name main.py imports with --enable-nki (aws-neuron/nki-moe main.py)
# A small Qwen3-MoE body for the fake NxDI model (the drop-in reads only these fields itself).
TINY = dict(
    hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, num_hidden_layers=2
)


def _forget(prefix: str) -> None:
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + "_kernels")]:
        del sys.modules[name]


@pytest.fixture
def harness(tmp_path, monkeypatch):
    """Fakes of the harness's imports on sys.path, and ``load(out)`` importing a written module as main.py would."""
    install = fakes.FakeInstall(tmp_path / "harness-site", fakes.HARNESS_FILES)
    loaded: list[str] = []
    added: list[str] = []

    def load(out, name: str = MODULE):
        # Not monkeypatch.syspath_prepend: its undo restores the sys.path it saved, fake site included.
        sys.path.insert(0, str(out.parent))
        added.append(str(out.parent))
        with monkeypatch.context() as block:
            block.setitem(sys.modules, "vllm_nki_moe", None)  # any import of our package now fails
            module = importlib.import_module(name)
        loaded.append(name)
        return module

    yield SimpleNamespace(load=load, utils=lambda: sys.modules["neuronx_distributed.utils"])
    for name in loaded:
        _forget(name)
    for path in added:
        while path in sys.path:
            sys.path.remove(path)
    install.remove()


@pytest.fixture
def written(tmp_path):
    out = tmp_path / "contest" / f"{MODULE}.py"
    assert cli.main(["export-contest", str(out)]) == 0
    return out


def neuron_config(**extra):
    """The MoE fields of NxDI's neuron config that initialize_moe_module reads, at MoENeuronConfig's defaults but for
    what NxDI's Qwen3-MoE config sets (router in fp32 with softmax; modeling_qwen3_moe.py) and bf16."""
    fields = dict(
        sequence_parallel_enabled=False,
        return_router_logits=False,
        torch_dtype=torch.bfloat16,
        glu_mlp=True,
        glu_type="glu",
        hidden_act_scaling_factor=1.0,
        hidden_act_bias=0.0,
        is_hidden_dim_shuffled=False,
        is_intermediate_dim_shuffled=False,
        gate_clamp_upper_limit=None,
        gate_clamp_lower_limit=None,
        up_clamp_upper_limit=None,
        up_clamp_lower_limit=None,
        early_expert_affinity_modulation=False,
        normalize_top_k_affinities=True,
    )
    return SimpleNamespace(router_config=SimpleNamespace(dtype=torch.float32, act_fn="softmax"), **{**fields, **extra})


def qwen3_rank_moe(seed: int):
    """NxD's MoE (the fakes) at Qwen3-30B-A3B per-rank sizes at TP 4 (hidden 2048, expert intermediate 192, top 8;
    16 of the 128 experts), random weights; and the generator, for inputs."""
    config = tiny_config(hidden_size=2048, intermediate_size=192, num_local_experts=16, num_experts_per_tok=8)
    moe = sys.modules["neuronx_distributed_inference.modules.moe_v2"].initialize_moe_module(config=config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        op = moe.expert_mlps.mlp_op
        op.gate_up_proj.weight.copy_(torch.randn(op.gate_up_proj.weight.shape, generator=gen) * 2048**-0.5)
        op.down_proj.weight.copy_(torch.randn(op.down_proj.weight.shape, generator=gen) * 192**-0.5)
        moe.router.linear_router.weight.copy_(torch.randn(16, 2048, generator=gen) * 0.02)
    return moe, gen


def tiny_config(**extra):
    fields = dict(TINY, num_local_experts=8, num_experts_per_tok=2, neuron_config=neuron_config())
    fields |= dict(intermediate_size=32, hidden_act="silu", rope_theta=1_000_000.0, max_position_embeddings=40960)
    return SimpleNamespace(**{**fields, **extra})


def test_written_module_imports_against_harness_fakes_and_exposes_what_main_py_uses(written, harness):
    qwen = harness.load(written)
    nxdi = sys.modules["neuronx_distributed_inference.models.qwen3_moe.modeling_qwen3_moe"]
    cls = qwen.NeuronQwen3MoeForCausalLM
    assert issubclass(cls, nxdi.NeuronQwen3MoeForCausalLM)
    # prepare_inference: get_neuron_config_cls()(**kwargs), get_config_cls()(neuron_config, load_config=...),
    # cls(model_path, config), compile(path, debug=...), load(path).
    neuron_config = cls.get_neuron_config_cls()(tp_degree=4, batch_size=1)
    config = cls.get_config_cls()(neuron_config, load_config=None)
    model = cls("/models/Qwen3-30B-A3B", config)
    model.compile("/tmp/traced", debug=False)
    model.load("/tmp/traced")
    assert cls._model_cls is qwen.NeuronQwen3MoeModel


def test_written_module_imports_nothing_from_vllm_nki_moe(written):
    text = written.read_text()
    tree = ast.parse(text)
    namespace: dict = {}
    for node in tree.body:  # the embedded kernel sources are data: parse them too
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "KERNEL_FILES":
            namespace = ast.literal_eval(node.value)
    assert namespace, "KERNEL_FILES not found"
    for source in [text, *namespace.values()]:
        for node in ast.walk(ast.parse(source)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "vllm_nki_moe" for n in names)


def test_embedded_kernels_are_the_kernel_files_byte_for_byte(written, harness):
    qwen = harness.load(written)
    files = {p.stem: p.read_text() for p in kernels_dir().glob("*.py") if p.name != "__init__.py"}
    assert qwen.KERNEL_FILES == files
    order = qwen.KERNEL_LOAD_ORDER
    importers = [stem for stem, source in files.items() if "from .limits import" in source]
    assert importers and all(order.index("limits") < order.index(stem) for stem in importers)  # dependencies first


def test_on_device_every_rmsnorm_is_the_kernel_module(written, harness):
    qwen = harness.load(written)
    if "rmsnorm" not in qwen.HOOKS:
        pytest.skip("kernels/rmsnorm.py is not present at export time")
    body = qwen.NeuronQwen3MoeForCausalLM("/m", tiny_config()).build_model()
    norms = [body.norm] + [
        m
        for layer in body.layers
        for m in (
            layer.input_layernorm,
            layer.post_attention_layernorm,
            layer.self_attn.q_layernorm,
            layer.self_attn.k_layernorm,
        )
    ]
    assert all(type(m) is qwen.NkiRMSNorm for m in norms)
    assert [tuple(m.weight.shape) for m in norms[1:5]] == [(64,), (64,), (16,), (16,)]  # checkpoint-shaped "weight"


def test_nxdi_fused_moe_kernel_keeps_its_post_attention_norm(written, harness):
    qwen = harness.load(written)
    body = qwen.NeuronQwen3MoeForCausalLM("/m", tiny_config(moe_fused_nki_kernel_enabled=True)).build_model()
    assert type(body.layers[0].post_attention_layernorm).__name__ == "CustomRMSNorm"


def test_cpu_mode_keeps_nxdi_and_hugging_face_layers(written, harness):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    qwen = harness.load(written)
    harness.utils().CPU_MODE[0] = True
    body = qwen.NeuronQwen3MoeForCausalLM("/m", tiny_config()).build_model()
    assert type(body.norm) is Qwen3MoeRMSNorm and type(body.layers[1].input_layernorm) is Qwen3MoeRMSNorm
    assert not any(name.startswith(f"{MODULE}_kernels") for name in sys.modules)  # no nki needed on CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (3, 7, 64), (2, 4, 5, 16)], ids=["1-token", "batch-seq", "heads"])
def test_kernel_rmsnorm_module_rounds_as_nxdis_custom_rmsnorm_in_the_emulator(written, harness, shape, dtype):
    """NxDI's CustomRMSNorm (modules/custom_calls.py): the input in fp32, RmsNorm with the weight, one cast back; on
    trn3 the harness compares logits with NxDI's, so the drop-in rounds that way (in fp32 that is HF's value too)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    import nki_emulator as emulator

    if not emulator.install():
        pytest.skip("the real nki package is installed: this test runs the kernels in the emulator")
    qwen = harness.load(written)
    if "rmsnorm" not in qwen.HOOKS:
        pytest.skip("kernels/rmsnorm.py is not present at export time")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype)
    ours = qwen.NkiRMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(shape[-1], generator=gen) + 0.5)
        x32 = x.float()
        nxdi = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6) * ours.weight.float()).to(dtype)
        tol = tolerance_for("float32" if dtype == torch.float32 else "bfloat16")
        torch.testing.assert_close(ours(x), nxdi, atol=tol.atol, rtol=tol.rtol)
        if dtype == torch.float32:
            hf = Qwen3MoeRMSNorm(shape[-1], eps=1e-6)
            hf.weight.copy_(ours.weight)
            torch.testing.assert_close(ours(x), hf(x), atol=tol.atol, rtol=tol.rtol)
    # nki.jit reads the kernel's source; the written kernel file must be visible to inspect.
    kernel = qwen.kernel("rmsnorm")
    assert "def rms_norm(" in inspect.getsource(getattr(kernel, "__wrapped__", kernel))


def test_kernels_load_from_real_source_files_beside_the_module(written, harness):
    """No exec or linecache: the kernels are written as files of the package <module>_kernels next to the module
    and imported from there, so inspect (and nki.jit) read them from disk; a stale file is rewritten."""
    import nki_emulator as emulator

    emulator.install()  # the kernel files import nki
    assert "linecache" not in written.read_text() and "exec(" not in written.read_text()
    folder = written.parent / f"{MODULE}_kernels"
    folder.mkdir()
    (folder / "limits.py").write_text("PMAX = 1  # an older export's file\n")
    qwen = harness.load(written)
    kernel = qwen.kernel("rmsnorm")
    path = inspect.getsourcefile(getattr(kernel, "fn", kernel))
    assert path == str(folder / "rmsnorm.py")
    assert (folder / "rmsnorm.py").read_text() == (kernels_dir() / "rmsnorm.py").read_text()
    assert (folder / "limits.py").read_text() == (kernels_dir() / "limits.py").read_text()  # rewritten
    assert qwen.load_kernels().limits.PMAX == 128


def test_a_read_only_folder_puts_the_kernel_files_under_the_temporary_directory(written, harness, monkeypatch):
    import os
    import tempfile

    qwen = harness.load(written)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    folder = qwen.kernel_folder()
    assert folder.startswith(tempfile.gettempdir()) and folder.endswith(f"{MODULE}_kernels")


def test_on_device_each_moe_router_is_the_kernel_router_with_the_checkpoints_parameters(written, harness):
    qwen = harness.load(written)
    plain = qwen.NeuronQwen3MoeForCausalLM("/m", tiny_config(hidden_size=128)).build_model()
    routers = [layer.mlp.router for layer in plain.layers]
    assert all(type(r) is qwen.NkiRouterTopK for r in routers)
    assert [k for k in plain.state_dict() if "router" in k] == [
        "layers.0.mlp.router.linear_router.weight",  # the name NxDI's state-dict conversion writes
        "layers.1.mlp.router.linear_router.weight",
    ]


@pytest.mark.parametrize(
    "config",
    [
        tiny_config(),  # hidden 64: the kernel contracts H in 128-row tiles
        tiny_config(hidden_size=128, neuron_config=neuron_config(return_router_logits=True)),
        tiny_config(hidden_size=128, neuron_config=neuron_config(sequence_parallel_enabled=True)),
        tiny_config(hidden_size=128, num_experts_per_tok=9, num_local_experts=16),
    ],
    ids=["hidden-64", "router-logits-returned", "sequence-parallel", "top-9"],
)
def test_the_router_hook_leaves_nxds_router_where_it_would_compute_something_else(written, harness, config):
    qwen = harness.load(written)
    body = qwen.NeuronQwen3MoeForCausalLM("/m", config).build_model()
    assert all(type(layer.mlp.router).__name__ == "RouterTopK" for layer in body.layers)
    harness.utils().CPU_MODE[0] = True  # and under cpu_mode() always
    cpu = qwen.NeuronQwen3MoeForCausalLM("/m", tiny_config(hidden_size=128)).build_model()
    assert all(type(layer.mlp.router).__name__ == "RouterTopK" for layer in cpu.layers)
    harness.utils().CPU_MODE[0] = False


@pytest.mark.parametrize("tokens", [1, 128])  # a decode step; the harness's measured prefill bucket
def test_kernel_router_matches_nxds_router_topk_at_qwen3_30b_a3b_shapes(written, harness, tokens):
    """Qwen3-30B-A3B (hidden 2048, 128 experts, top 8; NxDI's router in fp32 on bf16 hidden states) in the emulator:
    the same experts, and the same affinities where ExpertMLPsV2 reads them (chosen experts, renormalised as
    norm_topk_prob asks), within fp32 (NxD's softmax is fp64, ours fp32)."""
    import nki_emulator as emulator

    if not emulator.install():
        pytest.skip("the real nki package is installed: this test runs the kernels in the emulator")
    qwen = harness.load(written)
    routing = sys.modules["neuronx_distributed.modules.moe.routing"]
    nxd = routing.RouterTopK(num_experts=128, top_k=8, hidden_size=2048, dtype=torch.float32)
    with torch.no_grad():
        nxd.linear_router.weight.copy_(torch.randn(128, 2048, generator=torch.Generator().manual_seed(0)) * 0.02)
    hidden = torch.randn(1, tokens, 2048, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    _, want, want_index = nxd(hidden)
    ours = routing.RouterTopK(num_experts=128, top_k=8, hidden_size=2048, dtype=torch.float32)
    ours.load_state_dict(nxd.state_dict())
    assert qwen.router_hook_applies(ours, tiny_config())
    ours.__class__ = qwen.NkiRouterTopK
    logits, got, got_index = ours(hidden)
    assert logits is None and got.dtype == torch.bfloat16 and got_index.dtype == torch.long
    assert torch.equal(got_index, want_index)
    picked = got.float().gather(1, got_index)
    torch.testing.assert_close(picked, want.float().gather(1, want_index), rtol=1e-5, atol=1e-7)
    normalised = picked / picked.sum(1, keepdim=True)
    torch.testing.assert_close(
        normalised, want.float().gather(1, want_index) / want.float().gather(1, want_index).sum(1, keepdim=True)
    )
    assert (got.float().sum(1) <= 1.0 + 1e-3).all() and int((got != 0).sum()) == tokens * 8


def test_on_device_each_layers_routed_experts_take_token_generation_with_the_same_weights(written, harness):
    qwen = harness.load(written)
    body = qwen.NeuronQwen3MoeForCausalLM("/m", tiny_config(hidden_size=128)).build_model()
    assert all(type(layer.mlp.expert_mlps) is qwen.NkiExpertMLPsV2 for layer in body.layers)
    names = [k for k in body.state_dict() if "expert_mlps" in k][:2]
    assert names == [
        "layers.0.mlp.expert_mlps.mlp_op.gate_up_proj.weight",
        "layers.0.mlp.expert_mlps.mlp_op.down_proj.weight",
    ]


@pytest.mark.parametrize(
    "extra",
    [
        dict(hidden_act="gelu"),
        dict(neuron_config=neuron_config(early_expert_affinity_modulation=True)),
        dict(neuron_config=neuron_config(gate_clamp_upper_limit=7.0)),
        dict(neuron_config=neuron_config(sequence_parallel_enabled=True)),
        dict(neuron_config=neuron_config(glu_type="swiglu")),
        dict(hidden_size=64),
    ],
    ids=["gelu", "early-affinity", "clamp", "sequence-parallel", "swiglu", "hidden-64"],
)
def test_the_decode_experts_hook_leaves_nxds_experts_where_they_compute_something_else(written, harness, extra):
    qwen = harness.load(written)
    body = qwen.NeuronQwen3MoeForCausalLM("/m", tiny_config(**{"hidden_size": 128, **extra})).build_model()
    assert all(type(layer.mlp.expert_mlps).__name__ == "ExpertMLPsV2" for layer in body.layers)


@pytest.mark.parametrize("tokens", [1, 4])
def test_kernel_decode_experts_match_nxds_selective_loading_at_qwen3_30b_a3b_shapes(written, harness, tokens):
    """Qwen3-30B-A3B per rank at TP 4 (hidden 2048, expert intermediate 192, top 8; 16 of the 128 experts) in bf16,
    routed by NxD's RouterTopK: the kernel experts against the fake of NxD's forward_selective_loading (bf16 after
    every step) within the bf16 matmul tolerance; context encoding goes to NxD's own forward."""
    import nki_emulator as emulator

    if not emulator.install():
        pytest.skip("the real nki package is installed: this test runs the kernels in the emulator")
    qwen = harness.load(written)
    moe, gen = qwen3_rank_moe(seed=0)
    hidden = torch.randn(tokens, 2048, generator=gen).to(torch.bfloat16)
    _, affinities, index = moe.router(hidden)
    want = moe.expert_mlps(hidden, affinities, index, seq_len=1)
    assert qwen.moe_experts_hook_applies(moe.expert_mlps)
    moe.expert_mlps.__class__ = qwen.NkiExpertMLPsV2
    got = moe.expert_mlps(hidden, affinities, index, seq_len=1)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    tol = tolerance_for("bfloat16_matmul")
    torch.testing.assert_close(got.float(), want.float(), atol=tol.atol, rtol=tol.rtol)
    moe.expert_mlps.routed_experts_mlp_config.capacity_factor = 1.0  # token dropping: NxD's own path
    with pytest.raises(NotImplementedError, match="token dropping"):
        moe.expert_mlps(hidden, affinities, index, seq_len=tokens + 1)


@pytest.mark.parametrize("tokens", [128, 37])  # the harness's measured bucket; a prompt the bucket pads
def test_kernel_context_encoding_experts_match_nxds_dropless_experts_at_qwen3_30b_a3b_shapes(written, harness, tokens):
    """Context encoding (seq_len > 1, no capacity factor) at Qwen3-30B-A3B per-rank sizes (TP 4; 16 of the 128
    experts), routed by NxD's RouterTopK: the block table built by graph ops, the blockwise kernel on NxD's weights
    in the emulator, against the fake of NxD's dropless experts (bf16 after every step)."""
    import nki_emulator as emulator

    if not emulator.install():
        pytest.skip("the real nki package is installed: this test runs the kernels in the emulator")
    qwen = harness.load(written)
    moe, gen = qwen3_rank_moe(seed=1)
    hidden = torch.randn(tokens, 2048, generator=gen).to(torch.bfloat16)
    _, affinities, index = moe.router(hidden)
    want = moe.expert_mlps(hidden, affinities, index, seq_len=tokens)
    moe.expert_mlps.__class__ = qwen.NkiExpertMLPsV2
    got = moe.expert_mlps(hidden, affinities, index, seq_len=tokens)
    tol = tolerance_for("bfloat16_matmul")
    torch.testing.assert_close(got.float(), want.float(), atol=tol.atol, rtol=tol.rtol)


def test_on_device_each_attention_applies_rope_and_attends_by_the_kernels(written, harness):
    qwen = harness.load(written)
    body = qwen.NeuronQwen3MoeForCausalLM("/m", tiny_config()).build_model()
    assert all(type(layer.self_attn) is qwen.NkiRopeCoreAttention for layer in body.layers)
    assert all(type(layer.self_attn.q_layernorm) is qwen.NkiRMSNorm for layer in body.layers)  # still the norm hook


@pytest.mark.parametrize(
    "flags, attention_class",
    [
        (["--skip", "attention_prefill,attention_decode"], "NkiRopeAttention"),
        (["--only", "attention_decode"], "NkiCoreAttention"),
        (["--skip", "rope"], "NkiCoreAttention"),
        (["--only", "router"], "NeuronQwen3MoEAttention"),
    ],
)
def test_attention_wirings_follow_only_and_skip(tmp_path, harness, flags, attention_class):
    out = tmp_path / "bisect" / "qwen_attention.py"
    assert cli.main(["export-contest", str(out), *flags]) == 0
    qwen = harness.load(out, "qwen_attention")
    body = qwen.NeuronQwen3MoeForCausalLM("/m", tiny_config()).build_model()
    assert {type(layer.self_attn).__name__ for layer in body.layers} == {attention_class}


@pytest.mark.parametrize(
    "neuron_extra, config_extra",
    [
        (dict(k_cache_transposed=True), {}),
        (dict(flash_decoding_enabled=True), {}),
        (dict(padding_side="left"), {}),
        (dict(cp_degree=2), {}),
        (dict(attention_dp_degree=2), {}),
        ({}, dict(sliding_window=128)),
        ({}, dict(num_attention_heads=6, num_key_value_heads=4)),
    ],
    ids=[
        "k-cache-transposed",
        "flash-decoding",
        "left-padding",
        "context-parallel",
        "attention-data-parallel",
        "sliding-window",
        "uneven-gqa",
    ],
)
def test_the_attention_hook_leaves_nxdis_attention_where_it_would_compute_something_else(
    written, harness, neuron_extra, config_extra
):
    qwen = harness.load(written)
    config = tiny_config(neuron_config=neuron_config(**neuron_extra), **config_extra)
    body = qwen.NeuronQwen3MoeForCausalLM("/m", config).build_model()
    assert {type(layer.self_attn).__name__ for layer in body.layers} == {"NkiRopeAttention"}


def _rank_attention(qwen, heads: int, kv_heads: int, head_dim: int, **neuron_extra):
    """NxDI's attention (the fake) at one rank's head counts, and the same module with the attention hook."""
    nxdi = sys.modules["neuronx_distributed_inference.models.qwen3_moe.modeling_qwen3_moe"]
    config = tiny_config(
        head_dim=head_dim,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        neuron_config=neuron_config(**neuron_extra),
    )
    theirs, ours = nxdi.NeuronQwen3MoEAttention(config), nxdi.NeuronQwen3MoEAttention(config)
    ours.__class__ = qwen.NkiCoreAttention
    return theirs, ours


def _emulated(harness, written):
    import nki_emulator as emulator

    if not emulator.install():
        pytest.skip("the real nki package is installed: this test runs the kernels in the emulator")
    return harness.load(written)


# Qwen3-30B-A3B at TP 4 (8 q heads, 1 kv head of 128 per rank), the harness's 128-token bucket and shorter prompts in
# a batch with right padding; and GQA 2 of 64 with two kv heads, an odd length.
PREFILL_CASES = [(8, 1, 128, 128, (128,)), (8, 1, 128, 128, (128, 37)), (4, 2, 64, 45, (45, 1))]


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, seq, lengths", PREFILL_CASES, ids=["qwen3-bucket", "qwen3-padded", "gqa2-odd"]
)
def test_kernel_prefill_attention_matches_nxdis_native_path_on_every_real_token(
    written, harness, heads, kv_heads, head_dim, seq, lengths
):
    """perform_prefill on NxDI's mask (causal and right padding) in bf16: the kernel's rows of real tokens equal NxDI's
    native-compiler path (fp32 softmax, probabilities in bf16) within bf16 matmul tolerance; same strategy, shape."""
    qwen = _emulated(harness, written)
    theirs, ours = _rank_attention(qwen, heads, kv_heads, head_dim)
    gen = torch.Generator().manual_seed(3)
    B = len(lengths)
    Q, K, V = (torch.randn(B, h, seq, head_dim, generator=gen).to(torch.bfloat16) for h in (heads, kv_heads, kv_heads))
    real = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]  # [B, S]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    mask = (causal[None] & real[:, None, :])[:, None]  # [B, 1, S, S]
    want, want_strategy = theirs.perform_prefill(Q, K, V, seq, B, mask)
    got, strategy = ours.perform_prefill(Q, K, V, seq, B, mask)
    assert strategy == want_strategy and strategy.name == "NONE" and got.shape == want.shape and got.dtype == want.dtype
    tol = tolerance_for("bfloat16_matmul")
    for b, n in enumerate(lengths):
        torch.testing.assert_close(got[b, :, :n].float(), want[b, :, :n].float(), atol=tol.atol, rtol=tol.rtol)


def test_prefill_attention_leaves_nxdis_flash_kernel_strategy_to_nxdi(written, harness):
    """Where NxDI would run its own flash kernel (LNC 2, 256 tokens), the hook calls NxDI's perform_prefill (the fake
    does not model the kernel and says so)."""
    qwen = _emulated(harness, written)
    _, ours = _rank_attention(qwen, 2, 1, 16, logical_nc_config=2)
    x = torch.zeros(1, 2, 256, 16, dtype=torch.bfloat16)
    mask = torch.ones(256, 256, dtype=torch.bool).tril()[None, None]
    with pytest.raises(NotImplementedError, match="SHARDED_KERNEL"):
        ours.perform_prefill(x, x[:, :1], x[:, :1], 256, 1, mask)


def test_attention_beyond_the_kernels_head_dim_is_nxdis_per_call(written, harness):
    """head_dim 256 (over the kernels' MAX_HEAD_DIM, read from the kernel files at call time): both phases return
    exactly NxDI's result."""
    qwen = _emulated(harness, written)
    theirs, ours = _rank_attention(qwen, 2, 1, 256)
    gen = torch.Generator().manual_seed(5)
    Q, K, V = (torch.randn(1, h, 8, 256, generator=gen).to(torch.bfloat16) for h in (2, 1, 1))
    mask = torch.ones(8, 8, dtype=torch.bool).tril()[None, None]
    assert torch.equal(ours.perform_prefill(Q, K, V, 8, 1, mask)[0], theirs.perform_prefill(Q, K, V, 8, 1, mask)[0])
    cache = [torch.randn(1, 1, 16, 256, generator=gen).to(torch.bfloat16) for _ in range(2)]
    dmask = (torch.arange(16) < 5)[None, None, None, :]
    q1, k1, v1 = Q[:, :, :1], K[:, :, :1], V[:, :, :1]
    want = theirs.compute_for_token_gen(q1, k1, v1, torch.tensor([[5]]), [c.clone() for c in cache], dmask, None)
    assert torch.equal(ours.compute_for_token_gen(q1, k1, v1, torch.tensor([[5]]), cache, dmask, None), want)


# (heads, kv heads, head_dim, cache positions S, computed context lengths per sequence)
DECODE_CASES = [
    (8, 1, 128, 640, (639,)),
    (8, 1, 128, 640, (0, 200, 517)),
    (4, 2, 64, 96, (1, 95)),
    (4, 2, 32, 40, (7,)),
]


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, S, lengths", DECODE_CASES, ids=["qwen3-full", "qwen3-batch", "gqa2", "S-40"]
)
def test_kernel_decode_attention_matches_nxdis_prior_and_active_parts_on_its_cache(
    written, harness, heads, kv_heads, head_dim, S, lengths
):
    """compute_for_token_gen on NxDI's cache [B, Hkv, S, D] with the mask True below each sequence's computed length
    (an empty prior included) in bf16: the kernel's output equals NxDI's prior + active softmax within bf16 matmul
    tolerance; NxDI's cache reads the same afterwards everywhere but the new token's slot (the slot NxDI's KV cache
    manager writes with the same K/V after the layer)."""
    qwen = _emulated(harness, written)
    theirs, ours = _rank_attention(qwen, heads, kv_heads, head_dim)
    gen = torch.Generator().manual_seed(4)
    B = len(lengths)
    Q = torch.randn(B, heads, 1, head_dim, generator=gen).to(torch.bfloat16)
    K, V = (torch.randn(B, kv_heads, 1, head_dim, generator=gen).to(torch.bfloat16) for _ in range(2))
    cache = [torch.randn(B, kv_heads, S, head_dim, generator=gen).to(torch.bfloat16) for _ in range(2)]
    length = torch.tensor(lengths)
    mask = (torch.arange(S)[None, :] < length[:, None])[:, None, None, :]  # [B, 1, 1, S]
    positions = length[:, None]
    want = theirs.compute_for_token_gen(Q, K, V, positions, [c.clone() for c in cache], mask, None)
    before = [c.clone() for c in cache]
    got = ours.compute_for_token_gen(Q, K, V, positions, cache, mask, None)
    assert got.shape == want.shape == (B, heads, 1, head_dim) and got.dtype == want.dtype
    tol = tolerance_for("bfloat16_matmul")
    torch.testing.assert_close(got.float(), want.float(), atol=tol.atol, rtol=tol.rtol)
    untouched = torch.ones(B, 1, S, 1, dtype=torch.bool)
    untouched[torch.arange(B), 0, length] = False
    for now, then in zip(cache, before):
        assert torch.equal(torch.where(untouched, now, then), then)


def test_decode_attention_reads_a_cache_with_nxdis_padding_slots(written, harness):
    """With apply_seq_ids_mask NxDI's cache has 128 padding slots past the bucket's positions and the mask covers the
    positions only (NxDI pads it with False): the computed length is still the mask's count of True."""
    qwen = _emulated(harness, written)
    theirs, ours = _rank_attention(qwen, 8, 1, 128, apply_seq_ids_mask=True)
    gen = torch.Generator().manual_seed(6)
    positions, S = 640, 640 + 128
    Q = torch.randn(2, 8, 1, 128, generator=gen).to(torch.bfloat16)
    K, V = (torch.randn(2, 1, 1, 128, generator=gen).to(torch.bfloat16) for _ in range(2))
    cache = [torch.randn(2, 1, S, 128, generator=gen).to(torch.bfloat16) for _ in range(2)]
    length = torch.tensor([3, 639])
    mask = (torch.arange(positions)[None, :] < length[:, None])[:, None, None, :]
    want = theirs.compute_for_token_gen(Q, K, V, length[:, None], [c.clone() for c in cache], mask, None)
    got = ours.compute_for_token_gen(Q, K, V, length[:, None], cache, mask, None)
    tol = tolerance_for("bfloat16_matmul")
    torch.testing.assert_close(got.float(), want.float(), atol=tol.atol, rtol=tol.rtol)


def test_decode_attention_leaves_speculation_and_prefix_caching_to_nxdi(written, harness, monkeypatch):
    qwen = _emulated(harness, written)
    theirs, ours = _rank_attention(qwen, 2, 1, 16)
    gen = torch.Generator().manual_seed(5)
    Q = torch.randn(1, 2, 2, 16, generator=gen).to(torch.bfloat16)  # two speculated tokens
    K, V = (torch.randn(1, 1, 2, 16, generator=gen).to(torch.bfloat16) for _ in range(2))
    cache = [torch.randn(1, 1, 32, 16, generator=gen).to(torch.bfloat16) for _ in range(2)]
    mask = (torch.arange(32) < 9)[None, None, None, :].expand(1, 1, 2, 32)
    active = torch.ones(2, 2, dtype=torch.bool).tril()[None, None]
    monkeypatch.setitem(qwen.HOOKS, "attention_decode", ("missing", "missing"))  # any kernel call would fail
    for positions, prefix in ((torch.tensor([[9, 10]]), False), (torch.tensor([[9]]), True)):
        want = theirs.compute_for_token_gen(Q, K, V, positions, cache, mask, active, prefix)
        assert torch.equal(ours.compute_for_token_gen(Q, K, V, positions, cache, mask, active, prefix), want)


@pytest.mark.parametrize("batch, seq", [(1, 128), (2, 1), (1, 5)])  # the measured bucket; decode; a short prompt
def test_kernel_rope_matches_nxdis_rotary_embedding_at_qwen3_30b_a3b_shapes(written, harness, batch, seq):
    """Qwen3-30B-A3B at TP 4 (8 q heads and 1 kv head of 128 per rank, rope_theta 1e6) in bf16: the kernel RoPE
    against NxDI's apply_rotary_embedding on the same Q, K and positions, bit for bit (both round each product and
    sum to bf16 as torch does)."""
    import nki_emulator as emulator

    if not emulator.install():
        pytest.skip("the real nki package is installed: this test runs the kernels in the emulator")
    qwen = harness.load(written)
    config = tiny_config(head_dim=128)
    nxdi = sys.modules["neuronx_distributed_inference.models.qwen3_moe.modeling_qwen3_moe"]
    attention = nxdi.NeuronQwen3MoEAttention(config)
    gen = torch.Generator().manual_seed(2)
    Q = torch.randn(batch, 8, seq, 128, generator=gen).to(torch.bfloat16)
    K = torch.randn(batch, 1, seq, 128, generator=gen).to(torch.bfloat16)
    positions = torch.randint(0, 40000, (batch, seq), generator=gen)
    want_q, want_k, cos, sin = attention.apply_rotary_embedding(Q, K, K, positions, None, None, False)
    attention.__class__ = qwen.NkiRopeAttention
    got_q, got_k, got_cos, got_sin = attention.apply_rotary_embedding(Q, K, K, positions, None, None, False)
    assert torch.equal(got_cos, cos) and torch.equal(got_sin, sin)
    assert got_q.shape == want_q.shape and got_k.shape == want_k.shape
    torch.testing.assert_close(got_q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(got_k, want_k, rtol=0, atol=0)


def test_an_edited_embedded_kernel_is_refused(written, harness):
    qwen = harness.load(written)
    qwen.KERNEL_FILES["limits"] += "\n# edited\n"
    with pytest.raises(ImportError, match="embedded kernels/limits.py was edited; regenerate"):
        qwen.load_kernels()
    assert f"{MODULE}_kernels" not in sys.modules  # a failed load leaves no half package


def test_a_missing_kernel_file_leaves_nxdis_module_and_says_why(tmp_path, harness):
    kdir = tmp_path / "kernels"
    kdir.mkdir()
    (kdir / "limits.py").write_text((kernels_dir() / "limits.py").read_text())
    result = export_contest(tmp_path / "out" / "qwen_min.py", kdir)
    assert result.hooks == {
        "rmsnorm": "kernels/rmsnorm.py is not present",
        "rope": "kernels/rope.py is not present",
        "attention_prefill": "kernels/attention_prefill.py is not present",
        "attention_decode": "kernels/attention_decode.py is not present",
        "router": "kernels/router.py is not present",
        "moe_decode": "kernels/moe_nxdi.py is not present",
        "moe_prefill": "kernels/moe_prefill.py is not present",
    }
    qwen = harness.load(result.path, "qwen_min")
    assert qwen.HOOKS == {} and qwen.get_rmsnorm_cls().__name__ == "CustomRMSNorm"


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "limits.py not found"),
        ({"limits.py": "", "bad.py": "from vllm_nki_moe import ops\n"}, "imports vllm_nki_moe"),
        ({"limits.py": "", "a.py": "from .b import x\n", "b.py": "from .a import y\n"}, "import cycle"),
        ({"limits.py": "", "a.py": "from .missing import x\n"}, "kernels/missing.py, which does not exist"),
    ],
    ids=["no-limits", "imports-project", "cycle", "missing-sibling"],
)
def test_export_rejects_kernel_files_the_drop_in_cannot_carry(tmp_path, files, message):
    kdir = tmp_path / "kernels"
    kdir.mkdir()
    for name, text in files.items():
        (kdir / name).write_text(text)
    with pytest.raises(ExportError, match=message):
        export_contest(tmp_path / "qwen_with_nki.py", kdir)


def test_export_contest_cli_rejects_a_non_python_target(tmp_path, capsys):
    assert cli.main(["export-contest", str(tmp_path / "qwen_with_nki.txt")]) == 2
    assert "must be a .py file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, wired",
    [
        (["--skip", "rope,moe_prefill"], {"rmsnorm", "attention_prefill", "attention_decode", "router", "moe_decode"}),
        (["--only", "router"], {"router"}),
        (["--only", " moe_decode , moe_prefill"], {"moe_decode", "moe_prefill"}),
    ],
    ids=["skip", "only-one", "only-two-spaced"],
)
def test_only_and_skip_choose_the_wirings_and_the_module_keeps_nxdis_elsewhere(tmp_path, harness, capsys, flags, wired):
    out = tmp_path / "bisect" / "qwen_bisect.py"
    assert cli.main(["export-contest", str(out), *flags]) == 0
    printed = capsys.readouterr().out
    qwen = harness.load(out, "qwen_bisect")
    assert set(qwen.HOOKS) == wired
    flag = flags[0]
    for name in ("rmsnorm", "rope", "attention_prefill", "attention_decode", "router", "moe_decode", "moe_prefill"):
        expected = "wired" if name in wired else f"not wired, left out by {flag}"
        assert f"  {name}: {expected}\n" in printed
    assert (qwen.get_rmsnorm_cls().__name__ == "NkiRMSNorm") == ("rmsnorm" in wired)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--only", "router,attn"], "--only: no hook 'attn'; hooks: ('rmsnorm', 'rope'"),
        (["--skip", "norm"], "--skip: no hook 'norm'"),
    ],
)
def test_only_and_skip_name_the_hooks_there_are_when_given_another(tmp_path, capsys, flags, message):
    out = tmp_path / "qwen_with_nki.py"
    assert cli.main(["export-contest", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_only_and_skip_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["export-contest", str(tmp_path / "q.py"), "--only", "router", "--skip", "rope"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(ExportError, match="--only and --skip together"):
        export_contest(tmp_path / "q.py", only=("router",), skip=("rope",))


def test_report_counts_only_the_selected_wirings(tmp_path, capsys):
    assert cli.main(["export-contest", str(tmp_path / "q.py"), "--report", "--only", "rmsnorm,rope"]) == 0
    printed = capsys.readouterr().out
    assert "  router        no     ok       routing              left out by --only\n" in printed
    assert "rho (NKI share of MACs, the harness's rule): 0.0000" in printed  # norms and RoPE carry no MACs
    assert "NKI in 2 major part(s) (normalisation, positional encoding); does not meet" in printed
