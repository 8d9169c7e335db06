"""Every op as a registered torch custom op (namespace ``nki_moe``), so a tracer keeps it as one opaque node.

``torch.compile`` (vLLM's ``@support_torch_compile`` on CPU, vLLM Neuron's runner on Trainium) must see the model as
one graph. What runs inside an op is not traceable Python: an NKI kernel in the emulator (NumPy) or on the device,
vLLM's C++ CPU ops, routing-dependent host work (the experts' per-expert loop, the prefill kernel's block table),
per-call shape checks with logging. As custom ops, each is a node whose output shapes and dtypes come from a fake
implementation (:data:`FAKES`); its eager implementation runs the op as bound by ``ops.bind``.

The schema of ``nki_moe::<op>`` is inferred from the op's reference (its one signature) plus ``binding: str``, the key
of the ``ops.bind`` call whose implementations it runs (one process may hold several bindings: a model under test
and its torch baseline). The attention ops write the paged caches in place, declared as mutated arguments.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Callable

import torch

NAMESPACE = "nki_moe"
MUTATED = {
    name: ("k_cache", "v_cache")
    for name in ("attention_prefill", "attention_decode", "attention_block", "attention_block_fp8")
}
MUTATED["decoder_layers_fp8"] = ("k_caches", "v_caches")

_bindings: dict[str, dict[str, Callable]] = {}
_keys = itertools.count()
_defined: set[str] = set()


def _fake_like(*index: int) -> Callable:
    """Fake implementation returning ``empty_like`` of the given positional arguments (one, or a tuple)."""

    def fake(*args):
        outs = tuple(torch.empty_like(args[i]) for i in index)
        return outs[0] if len(outs) == 1 else outs

    return fake


def _fake_silu_mul(gate_up, binding):
    return gate_up.new_empty(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


def _fake_topk(logits_or_hidden, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = logits_or_hidden.shape[0]
    weights = logits_or_hidden.new_empty(rows, top_k, dtype=torch.float32)
    return weights, logits_or_hidden.new_empty(rows, top_k, dtype=torch.int64)


# Output shapes and dtypes of each op for tracing (fake tensors in, fake tensors out; nothing is computed).
FAKES: dict[str, Callable] = {
    "rms_norm": _fake_like(0),
    "fused_add_rms_norm": _fake_like(0, 0),
    "linear": lambda x, weight, binding: x.new_empty(x.shape[0], weight.shape[0]),
    "apply_rope": _fake_like(0, 1),
    "qk_norm_rope": _fake_like(0, 1),
    "silu_mul": _fake_silu_mul,
    "router_topk": lambda logits, top_k, renormalize, binding: _fake_topk(logits, top_k),
    "router_gate_topk": lambda hidden, gate_weight, top_k, renormalize, binding: _fake_topk(hidden, top_k),
    "moe_experts": _fake_like(0),
    "moe_experts_fp8": _fake_like(0),
    "linear_fp8": lambda x, weight, weight_scale_inv, binding: x.new_empty(x.shape[0], weight.shape[0]),
    "moe_block": _fake_like(0, 0),
    "moe_block_fp8": _fake_like(0, 0),
    "attention_block": _fake_like(0, 0),
    "attention_block_fp8": _fake_like(0, 0),
    "decoder_layers_fp8": _fake_like(0, 0),
    "attention_prefill": _fake_like(0),
    "attention_decode": _fake_like(0),
}


def _define(name: str, signature_of: Callable) -> None:
    """Register ``nki_moe::<name>`` once per process, its schema from ``signature_of`` plus ``binding: str``."""
    if name in _defined:
        return
    sig = inspect.signature(signature_of)
    params = [
        *sig.parameters.values(),
        inspect.Parameter("binding", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str),
    ]

    def run(*args):
        *op_args, binding = args
        return _bindings[binding][name](*op_args)

    run.__signature__ = sig.replace(parameters=params)
    run.__name__ = name
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", run, mutates_args=MUTATED.get(name, ()))
    op.register_fake(FAKES[name])
    _defined.add(name)


def register(impls: dict[str, Callable], signatures: dict[str, Callable]) -> tuple[str, dict[str, Callable]]:
    """Make a binding's implementations callable as ``torch.ops.nki_moe.<op>``; returns the binding's key and the
    callers (the op's signature, the key appended).

    ``signatures[name]`` is the function whose signature the op has (its reference, or the composite's sequence).
    """
    key = str(next(_keys))
    _bindings[key] = dict(impls)
    callers = {}
    for name in impls:
        _define(name, signatures[name])
        op = getattr(getattr(torch.ops, NAMESPACE), name)
        callers[name] = _caller(op, key)
    return key, callers


def _caller(op, key: str) -> Callable:
    def call(*args):
        return op(*args, key)

    return call
