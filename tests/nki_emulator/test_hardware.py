"""The emulator's trn2 table and the kernels' limits are two copies of the same facts (the emulator imports nothing of
the project; kernels run without the emulator on hardware): every fact the kernels tile by must agree."""

import ast
from pathlib import Path

from vllm_nki_moe.kernels import limits

import nki_emulator
from nki_emulator import hardware

REPO = Path(__file__).resolve().parents[2]


def _constants(module) -> dict[str, int]:
    return {k: v for k, v in vars(module).items() if k.isupper() and isinstance(v, int)}


def test_kernel_limits_agree_with_the_emulator_hardware_table():
    kernel_facts, emulator_facts = _constants(limits), _constants(hardware)
    assert kernel_facts, "no constants found in kernels/limits.py"
    assert kernel_facts.keys() <= emulator_facts.keys(), sorted(kernel_facts.keys() - emulator_facts.keys())
    assert {k: emulator_facts[k] for k in kernel_facts} == kernel_facts


def test_emulator_imports_nothing_of_the_project():
    for path in Path(nki_emulator.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names.append(node.module or "")
            assert not any(n.split(".")[0] == "vllm_nki_moe" for n in names), f"{path.name} imports {names}"
