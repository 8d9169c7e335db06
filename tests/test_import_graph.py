"""The layout's import rules, from the source (every import, including those inside functions):

- no import cycles among the project's modules (a package counts as its ``__init__``);
- ``nki_emulator`` imports nothing of the project; ``kernels/`` imports only itself (and ``nki``/torch);
- only ``vllm_nki_moe.ops`` (and the kernel-check tool, the kernels' own harness) imports the kernels.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {
    "vllm_nki_moe": REPO / "vllm_nki_moe",
    "nki_emulator": REPO / "nki_emulator",
    "vllm_nki_moe.kernels": REPO / "kernels",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports (the longest known prefix of each imported name)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n != name:
                targets.add(n)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _is_package_of(a: str, b: str) -> bool:
    return b.startswith(a + ".")


def test_no_import_cycles():
    graph = _graph()
    # a package importing its own submodules (re-exports, registries) is not a cycle with them
    edges = {
        a: {b for b in targets if not _is_package_of(a, b) and not _is_package_of(b, a)} for a, targets in graph.items()
    }
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_layers_import_only_downwards():
    graph = _graph()
    for name, targets in graph.items():
        if name.startswith("nki_emulator"):
            assert all(t.startswith("nki_emulator") for t in targets), (name, targets)
        elif name.startswith("vllm_nki_moe.kernels"):
            assert all(t.startswith("vllm_nki_moe.kernels") for t in targets), (name, targets)
        elif any(t.startswith("vllm_nki_moe.kernels") for t in targets):
            assert name.startswith(("vllm_nki_moe.ops", "vllm_nki_moe.tools.kernel_check")), (name, targets)
