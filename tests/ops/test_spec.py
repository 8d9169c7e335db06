"""Each op is declared once: its reference's signature is the op's, and every other implementation takes exactly the
same parameters (the kernel binding after its ``backend``), so no implementation can drift from the op."""

from __future__ import annotations

import inspect

import pytest

from vllm_nki_moe import ops

SPECS = list(ops.SPECS.values())


def _params(fn, skip: int = 0) -> list[str]:
    return list(inspect.signature(fn).parameters)[skip:]


@pytest.mark.parametrize("spec", [s for s in SPECS if not s.composite], ids=lambda s: s.name)
def test_host_and_kernel_take_the_reference_signature(spec):
    want = _params(spec.reference)
    if spec.host is not None:
        assert _params(spec.host) == want
    if spec.kernel is not None:
        assert _params(spec.kernel.run, skip=1) == want  # run(backend, *op args)
        assert _params(spec.kernel.supports) == want


@pytest.mark.parametrize("spec", [s for s in SPECS if s.composite], ids=lambda s: s.name)
def test_composite_kernel_takes_the_sequence_signature(spec):
    # a composite may be built from the composites before it (their callables are not called here)
    references = {name: ops.SPECS[name].reference for name in ops.OP_NAMES}
    sequence = spec.compose(references | {name: None for name in ops.COMPOSITE_OPS})
    want = _params(sequence)
    assert _params(spec.kernel.run, skip=1) == want and _params(spec.kernel.supports) == want


def test_every_op_of_the_opset_is_declared_once():
    not_ops = ("backend", "kernel_ops", "weight_preparers", "implementations", "binding")
    fields = [f for f in ops.OpSet.__dataclass_fields__ if f not in not_ops]
    assert sorted(fields) == sorted(ops.SPECS)
    names = [spec.name for family in ops.FAMILIES for spec in family.SPECS]
    assert len(names) == len(set(names))
