"""The Python subset each NKI release's compiler accepts, checked on a kernel's source before it runs.

The real compiler specialises a kernel by interpreting its Python (nki/get-started/nki-language-guide.rst,
"Compilation model"), and rejects constructs its release does not support. The emulator runs any Python, so this
module reads the kernel's source (and the source of the project functions it calls, where it can find them) and
reports what the selected release would reject. Every rule names its first release, the statement and its source:

- ``aws-neuron/aws-neuron-sdk:release-notes/components/nki.rst`` (per-release notes, "Breaking changes");
- ``aws-neuron/aws-neuron-sdk:nki/migration/index.rst`` ("Language restrictions" for 0.3.0; "Rules for migrated
  loops" for 0.6.0);
- ``aws-neuron/aws-neuron-sdk:nki/get-started/nki-language-guide.rst`` (values and containers, "Class Support"; the
  text is unchanged since Neuron 2.27 / NKI 0.1.0).

Public API:
    check(fn, nki_version) -> list[Violation]     every violation in ``fn`` (a function or ``@nki.jit`` kernel)
    oldest_release(fn) -> str | None              the oldest emulated release whose rules ``fn`` satisfies
    enforce(fn, nki_version)                      raise NkiEmulatorError for the first violation (used at launch)
    RULES, RELEASES                               the rule table and the releases the emulator imitates
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import os
import sys
import textwrap
import types
from typing import Callable

from .errors import NkiEmulatorError

# NKI release -> Neuron SDK release (nki/migration/index.rst, "NKI version to Neuron SDK mapping").
RELEASES = {"0.2": "2.28", "0.3": "2.29", "0.4": "2.30", "0.5": "2.31", "0.6": "2.32"}
DEFAULT_RELEASE = "0.6"  # the newest release the project targets (STYLE.md, "Kernel code the compiler accepts")

_NOTES = "release-notes/components/nki.rst"
_MIGRATION = "nki/migration/index.rst"
_GUIDE = "nki/get-started/nki-language-guide.rst"


def release_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def normalize_release(version: str, where: str = "nki_version") -> str:
    """'0.6', '0.6.0' or 'v0.6' -> '0.6'; anything else is rejected with the supported list."""
    v = str(version).strip().lstrip("v")
    parts = v.split(".")
    v = ".".join(parts[:2]) if len(parts) >= 2 and all(p.isdigit() for p in parts) else v
    if v not in RELEASES:
        raise NkiEmulatorError(
            f"{where}: nki_version={version!r}; the emulator imitates NKI {', '.join(RELEASES)} "
            f"(Neuron SDK {', '.join(RELEASES.values())}; nki/migration/index.rst version table)"
        )
    return v


@dataclasses.dataclass(frozen=True)
class Rule:
    """One language rule: ``since`` is the first release that rejects (or lacks) the construct."""

    id: str
    since: str
    statement: str
    source: str
    until: str | None = None  # first release that accepts it again (None: still rejected)

    def applies(self, version: str) -> bool:
        k = release_key(version)
        return k >= release_key(self.since) and (self.until is None or k < release_key(self.until))


@dataclasses.dataclass(frozen=True)
class Violation:
    """A construct in a kernel's source that the selected release rejects."""

    rule: Rule
    function: str
    filename: str
    lineno: int
    line: str
    detail: str

    def format(self, version: str) -> str:
        """``<where>: <what>=<value>; <rule>`` with the offending source line."""
        return (
            f"{self.function} ({os.path.basename(self.filename)}:{self.lineno}): {self.detail} in `{self.line}`; "
            f"{self.rule.statement} (NKI {version} rule {self.rule.id}, since NKI {self.rule.since}: "
            f"aws-neuron-sdk:{self.rule.source})"
        )


_R = [
    Rule(
        "kw-only-separator",
        "0.3",
        "the keyword-only separator `*` is not supported in kernel signatures; move parameters with defaults last",
        f"{_NOTES} (0.3.0 breaking changes); {_MIGRATION} 'Remove keyword-only argument separator'",
    ),
    Rule(
        "is-operator",
        "0.3",
        "`is` / `is not` are not supported (except against None); use == / !=",
        f"{_NOTES} (0.3.0 breaking changes); {_MIGRATION} 'Replace is / is not with == / !=' (example `flag is True`;"
        " `x is None` stays accepted: aws-neuron/nki-library at tag 2.29, written for NKI 0.3, uses it in traced "
        "code some 400 times, e.g. core/utils/kernel_helpers.py reduce)",
    ),
    Rule(
        "list-argument",
        "0.3",
        "list kernel arguments are not supported; pass tuples",
        f"{_NOTES} (0.3.0 breaking changes); {_MIGRATION} 'Replace list kernel arguments with tuples'",
    ),
    Rule(
        "neuronxcc-namespace",
        "0.4",
        "the neuronxcc.nki namespace inside kernels is a compilation error; use nki.*",
        f"{_NOTES} (0.4.0 breaking changes); {_MIGRATION} 'neuronxcc.nki.* inside kernels'",
    ),
    Rule(
        "dict-key",
        "0.2",
        "dictionary keys must be strings",
        f"{_GUIDE} 'Dictionaries with string-value keys' (since Neuron 2.27)",
    ),
    Rule(
        "class-base",
        "0.2",
        "a class used in a kernel must inherit from NKIObject and no other class (or be an Enum)",
        f"{_GUIDE} 'Class Support' (since Neuron 2.27)",
    ),
    Rule(
        "loop-body-return",
        "0.6",
        "the fori_loop body cannot return a value; the while_loop body returns only the next condition",
        f"{_MIGRATION} 'Rules for migrated loops'",
    ),
    Rule(
        "loop-in-no-reorder",
        "0.6",
        "fori_loop / while_loop cannot sit inside an nl.no_reorder() block",
        f"{_MIGRATION} 'Rules for migrated loops'",
    ),
    Rule(
        "name-unavailable",
        "0.2",
        "the name does not exist in this release",
        f"{_NOTES} (the release that added or removed it)",
    ),
]
RULES: dict[str, Rule] = {r.id: r for r in _R}

# Names that exist only from (or until) a release: module -> name -> (since, until, source).
NAMES: dict[str, dict[str, tuple[str, str | None, str]]] = {
    "language": {
        "fori_loop": ("0.6", None, f"{_NOTES} 0.6.0 'nl.fori_loop and nl.while_loop'"),
        "while_loop": ("0.6", None, f"{_NOTES} 0.6.0 'nl.fori_loop and nl.while_loop'"),
        "abs_max": ("0.4", None, f"{_NOTES} 0.4.0 'nki.language.abs_max and nki.language.abs_min'"),
        "abs_min": ("0.4", None, f"{_NOTES} 0.4.0 'nki.language.abs_max and nki.language.abs_min'"),
        "float8_e8m0fnu": ("0.5", None, f"{_NOTES} 0.5.0 'float8_e8m0fnu dtype'"),
        "load": ("0.3", None, f"{_NOTES} 0.3.0 'nki.language APIs (Experimental)'"),
        "store": ("0.3", None, f"{_NOTES} 0.3.0 'nki.language APIs (Experimental)'"),
        "matmul": ("0.3", None, f"{_NOTES} 0.3.0 'nki.language APIs (Experimental)'"),
        "softmax": ("0.3", None, f"{_NOTES} 0.3.0 'nki.language APIs (Experimental)'"),
    },
    "isa": {
        "topk": ("0.6", None, f"{_NOTES} 0.6.0 'nisa.topk'"),
        "activate2": ("0.4", None, f"{_NOTES} 0.4.0 'nki.isa.activate2'"),
        "exponential": ("0.3", None, f"{_NOTES} 0.3.0 'nki.isa.exponential'"),
        "dma_engine": ("0.3", None, f"{_NOTES} 0.3.0 'nki.isa.dma_engine alias repurposed'"),
    },
    "simulate": {"simulate": ("0.3", None, f"{_NOTES} 0.3.0 'NKI CPU Simulator'")},
}
# NkiTensor view and query methods added in 0.5.0 (reshape, view, ap and get_pattern existed before).
TENSOR_METHODS_0_5 = (
    "slice",
    "select",
    "permute",
    "broadcast",
    "expand_dim",
    "squeeze_dim",
    "reshape_dim",
    "flatten_dims",
    "rearrange",
    "vector_select",
    "is_contiguous",
    "is_indirect",
)
TENSOR_METHODS_SOURCE = f"{_NOTES} 0.5.0 'New NkiTensor view primitives'"


def name_available(module: str, name: str, version: str) -> tuple[bool, str]:
    """Whether ``nki.<module>.<name>`` exists in ``version``, and the source that says so."""
    entry = NAMES.get(module, {}).get(name)
    if entry is None:
        return True, ""
    since, until, source = entry
    k = release_key(version)
    ok = k >= release_key(since) and (until is None or k < release_key(until))
    return ok, f"{source}: available from NKI {since}" + (f" until {until}" if until else "")


# ----- AST checks ---------------------------------------------------------------------------------------------------
def _source(fn: Callable) -> tuple[ast.AST, str, int, list[str]] | None:
    """(AST of the function, filename, first line number, source lines) or None when the source is unavailable."""
    try:
        lines, start = inspect.getsourcelines(fn)
        filename = inspect.getsourcefile(fn) or "<unknown>"
    except (OSError, TypeError):
        return None
    src = textwrap.dedent("".join(lines))
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return None
    ast.increment_lineno(tree, start - 1)
    return tree, filename, start, lines


def _is_project_function(f: object) -> bool:
    """A plain Python function from user code (not the emulator, the standard library or an installed package)."""
    if not isinstance(f, types.FunctionType):
        return False
    mod = getattr(f, "__module__", "") or ""
    if mod.startswith(("nki_emulator", "nki")) and mod.split(".")[0] in ("nki_emulator", "nki"):
        return False
    try:
        path = inspect.getsourcefile(f) or ""
    except TypeError:
        return False
    return bool(path) and "site-packages" not in path and not path.startswith(sys.base_prefix)


def _is_project_class(c: type) -> bool:
    try:
        path = inspect.getsourcefile(c) or ""
    except TypeError:
        return False
    return bool(path) and "site-packages" not in path and not path.startswith(sys.base_prefix)


def _project_method_names(g: dict) -> set[str]:
    """Method names of the project classes a function sees: its globals and the project modules among them."""
    classes = [v for v in g.values() if isinstance(v, type)]
    for v in g.values():
        skip = ("nki", "nki_emulator", "numpy", "torch")
        if isinstance(v, types.ModuleType) and v.__name__.split(".")[0] not in skip:
            path = getattr(v, "__file__", "") or ""
            if path and "site-packages" not in path and not path.startswith(sys.base_prefix):
                classes.extend(c for c in vars(v).values() if isinstance(c, type))
    return {n for c in classes if _is_project_class(c) for n, a in vars(c).items() if callable(a)}


def _nki_class(c: type) -> bool:
    """Inherits from NKIObject and no other class (or is an Enum), as nki-language-guide.rst 'Class Support' asks."""
    from enum import Enum

    if issubclass(c, Enum):
        return True
    chain = [b for b in c.__mro__[1:] if b is not object]
    return (
        bool(chain)
        and all(b.__name__ == "NKIObject" or len(b.__bases__) == 1 for b in chain)
        and any(b.__name__ == "NKIObject" for b in chain)
    )


def _class_dict_attrs(fn: Callable) -> set[str]:
    """``self.<attr>`` names a method's class assigns a dict to (in any of its methods)."""
    qual = getattr(fn, "__qualname__", "")
    if "." not in qual or "<locals>" in qual:
        return set()
    cls = getattr(fn, "__globals__", {}).get(qual.split(".")[0])
    if not isinstance(cls, type):
        return set()
    out = set()
    for v in vars(cls).values():
        parsed = _source(v) if isinstance(v, types.FunctionType) else None
        if parsed is None:
            continue
        for node in ast.walk(parsed[0]):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                val = node.value
                if isinstance(val, ast.Dict) or (
                    isinstance(val, ast.Call) and isinstance(val.func, ast.Name) and val.func.id == "dict"
                ):
                    out.update(ast.unparse(t) for t in targets if isinstance(t, ast.Attribute))
    return out


def _module_aliases(g: dict) -> dict[str, str]:
    """Global names bound to ``nki.language`` / ``nki.isa`` (or the emulator's modules) -> 'language' / 'isa'."""
    out = {}
    for k, v in g.items():
        if isinstance(v, types.ModuleType):
            name = v.__name__
            if name in ("nki.language", "nki_emulator.language"):
                out[k] = "language"
            elif name in ("nki.isa", "nki_emulator.isa"):
                out[k] = "isa"
    return out


class _Checker(ast.NodeVisitor):
    def __init__(self, fn: Callable, filename: str, lines: list[str], start: int, version: str, top: bool):
        self.fn, self.filename, self.lines, self.start = fn, filename, lines, start
        self.version, self.top = version, top
        self.g = getattr(fn, "__globals__", {})
        self.aliases = _module_aliases(self.g)
        self.ambiguous = _project_method_names(self.g)
        self.out: list[Violation] = []
        self.callees: list[Callable] = []
        self.no_reorder_depth = 0
        self.loop_bodies: dict[str, str] = {}  # nested function name -> 'fori_loop' / 'while_loop'

    def _line(self, node: ast.AST) -> str:
        i = getattr(node, "lineno", self.start) - self.start
        return self.lines[i].strip() if 0 <= i < len(self.lines) else ""

    def flag(self, rule_id: str, node: ast.AST, detail: str) -> None:
        rule = RULES[rule_id]
        if rule.applies(self.version):
            name = getattr(self.fn, "__qualname__", getattr(self.fn, "__name__", "kernel"))
            self.out.append(Violation(rule, name, self.filename, getattr(node, "lineno", 0), self._line(node), detail))

    # signature of the kernel itself
    def check_signature(self, node: ast.FunctionDef) -> None:
        if self.top and node.args.kwonlyargs:
            names = ", ".join(a.arg for a in node.args.kwonlyargs)
            self.flag("kw-only-separator", node, f"keyword-only parameters=({names})")

    def visit_Compare(self, node: ast.Compare) -> None:
        operands = [node.left, *node.comparators]
        for i, op in enumerate(node.ops):
            if isinstance(op, (ast.Is, ast.IsNot)):
                a, b = operands[i], operands[i + 1]
                if any(isinstance(x, ast.Constant) and x.value is None for x in (a, b)):
                    continue  # `x is None` is accepted: see RULES['is-operator']
                self.flag("is-operator", node, f"operator={'is' if isinstance(op, ast.Is) else 'is not'}")
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for k in node.keys:
            if k is None:
                continue
            if isinstance(k, ast.Constant) and not isinstance(k.value, str) or isinstance(k, ast.Tuple):
                self.flag("dict-key", k, f"key={ast.unparse(k)}")
        self.generic_visit(node)

    def collect_dicts(self, tree: ast.AST, extra: set[str]) -> None:
        """Containers known to be dicts (``x = {}``, ``x: dict = {}``, ``self.x = dict()``), names bound to tuples."""
        self.dicts, self.tuple_names = set(extra), set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                v = node.value
                is_dict = isinstance(v, (ast.Dict, ast.DictComp)) or (
                    isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "dict"
                )
                for t in targets:
                    if is_dict:
                        self.dicts.add(ast.unparse(t))
                    if isinstance(v, ast.Tuple) and isinstance(t, ast.Name):
                        self.tuple_names.add(t.id)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if ast.unparse(node.value) in getattr(self, "dicts", ()):
            k = node.slice
            bad = (
                isinstance(k, ast.Tuple)
                or (isinstance(k, ast.Constant) and not isinstance(k.value, str))
                or (isinstance(k, ast.Name) and k.id in self.tuple_names)
            )
            if bad:
                kind = " (a tuple)" if isinstance(k, ast.Name) else ""
                self.flag("dict-key", node, f"key={ast.unparse(k)}{kind} of dict {ast.unparse(node.value)}")
        self.generic_visit(node)

    def visit_DictComp(self, node: ast.DictComp) -> None:
        k = node.key
        if isinstance(k, ast.Constant) and not isinstance(k.value, str) or isinstance(k, ast.Tuple):
            self.flag("dict-key", k, f"key={ast.unparse(k)}")
        self.generic_visit(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        bases = [ast.unparse(b) for b in node.bases]
        ok = len(bases) == 1 and (bases[0].split(".")[-1] in ("NKIObject", "Enum", "IntEnum"))
        if not ok:
            self.flag("class-base", node, f"class {node.name}({', '.join(bases)})")
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.startswith("neuronxcc.nki") or a.name == "neuronxcc":
                self.flag("neuronxcc-namespace", node, f"import {a.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if (node.module or "").startswith("neuronxcc"):
            self.flag("neuronxcc-namespace", node, f"from {node.module} import ...")

    def visit_With(self, node: ast.With) -> None:
        reorder = any("no_reorder" in ast.unparse(item.context_expr) for item in node.items)
        self.no_reorder_depth += reorder
        self.generic_visit(node)
        self.no_reorder_depth -= reorder

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name):
            mod = self.aliases.get(node.value.id)
            if mod is not None:
                ok, source = name_available(mod, node.attr, self.version)
                if not ok:
                    self.flag("name-unavailable", node, f"name=nki.{mod}.{node.attr} ({source})")
            elif node.value.id == "neuronxcc":
                self.flag("neuronxcc-namespace", node, f"name={ast.unparse(node)}")
        # NkiTensor's 0.5 methods (also checked when called, tensor.set_view_methods): other classes share their
        # names (nki-library's TensorView has slice/permute/select), so a call is only reported when no project
        # class visible to the function defines a method of that name.
        if (
            release_key(self.version) < (0, 5)
            and node.attr in TENSOR_METHODS_0_5
            and isinstance(node.ctx, ast.Load)
            and node.attr not in self.ambiguous
        ):
            self.flag(
                "name-unavailable",
                node,
                f"NkiTensor.{node.attr} ({TENSOR_METHODS_SOURCE}: available from NKI 0.5)",
            )
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            mod = self.aliases.get(f.value.id)
            if mod == "language" and f.attr in ("fori_loop", "while_loop"):
                if self.no_reorder_depth:
                    self.flag("loop-in-no-reorder", node, f"nl.{f.attr} inside `with nl.no_reorder()`")
                body = node.args[2] if f.attr == "fori_loop" and len(node.args) > 2 else None
                if f.attr == "while_loop" and len(node.args) > 1:
                    body = node.args[1]
                for kw in node.keywords:
                    if kw.arg == "body_fun":
                        body = kw.value
                if isinstance(body, ast.Name):
                    self.loop_bodies[body.id] = f.attr
        target = None
        if isinstance(f, ast.Name):
            target = self.g.get(f.id)
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            owner = self.g.get(f.value.id)
            if isinstance(owner, types.ModuleType):
                target = getattr(owner, f.attr, None)
        target = getattr(target, "fn", target)  # a Kernel wraps its function
        if _is_project_function(target):
            self.callees.append(target)
        elif isinstance(target, type) and _is_project_class(target):
            if not _nki_class(target):
                bases = ", ".join(b.__name__ for b in target.__bases__)
                self.flag("class-base", node, f"class {target.__name__}({bases}) instantiated")
            self.callees.extend(v for v in vars(target).values() if _is_project_function(v))
        self.generic_visit(node)

    def check_loop_bodies(self, tree: ast.AST) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in self.loop_bodies:
                kind = self.loop_bodies[node.name]
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Return) and sub.value is not None and kind == "fori_loop":
                        if not (isinstance(sub.value, ast.Constant) and sub.value.value is None):
                            self.flag("loop-body-return", sub, f"fori_loop body {node.name} returns a value")


def _check_one(fn: Callable, version: str, top: bool) -> tuple[list[Violation], list[Callable]]:
    parsed = _source(fn)
    if parsed is None:
        return [], []
    tree, filename, start, lines = parsed
    c = _Checker(fn, filename, lines, start, version, top)
    c.collect_dicts(tree, _class_dict_attrs(fn))
    fdef = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if fdef is not None:
        c.check_signature(fdef)
        fdef.decorator_list = []  # decorators are host code
    c.visit(tree)
    c.check_loop_bodies(tree)
    return c.out, c.callees


MAX_HELPERS = 200  # helper functions followed per kernel (transitively); enough for nki-library's largest kernels


@functools.lru_cache(maxsize=512)
def _check_cached(fn: Callable, version: str) -> tuple[Violation, ...]:
    seen: set[int] = set()
    out: list[Violation] = []
    queue = [(fn, True)]
    while queue and len(seen) < MAX_HELPERS:
        f, top = queue.pop(0)
        if id(f) in seen:
            continue
        seen.add(id(f))
        found, callees = _check_one(f, version, top)
        out.extend(found)
        queue.extend((c, False) for c in callees)
    return tuple(out)


def check(fn: Callable, nki_version: str = DEFAULT_RELEASE) -> list[Violation]:
    """Every construct in ``fn`` (and the project functions it calls) that NKI ``nki_version`` rejects."""
    version = normalize_release(nki_version, "language_rules.check")
    fn = getattr(fn, "fn", fn)  # an @nki.jit Kernel
    try:
        return list(_check_cached(fn, version))
    except TypeError:  # unhashable callable
        return list(_check_cached.__wrapped__(fn, version))


def oldest_release(fn: Callable) -> str | None:
    """The oldest emulated NKI release from which on ``fn`` satisfies every newer release's rules too (None: the
    newest release, 0.6, rejects it). A kernel that only 0.2 accepts (e.g. one using ``is``) gets None."""
    oldest = None
    for version in reversed(list(RELEASES)):
        if check(fn, version):
            break
        oldest = version
    return oldest


def enforce(fn: Callable, nki_version: str) -> None:
    """Raise ``NkiEmulatorError`` naming the first violation (the launch-time check of ``nki.jit`` kernels)."""
    found = check(fn, nki_version)
    if found:
        more = f" (and {len(found) - 1} more: language_rules.check lists them)" if len(found) > 1 else ""
        name = getattr(getattr(fn, "fn", fn), "__name__", "kernel")
        raise NkiEmulatorError(f"kernel {name}: " + found[0].format(nki_version) + more)


def check_arguments(args: tuple, kwargs: dict, nki_version: str, where: str) -> None:
    """Runtime argument rules: list arguments (0.3+); objects of classes not derived from NKIObject (guide)."""
    version = normalize_release(nki_version)
    rule = RULES["list-argument"]
    if not rule.applies(version):
        return
    for i, a in [(str(i), a) for i, a in enumerate(args)] + list(kwargs.items()):
        if isinstance(a, list):
            raise NkiEmulatorError(
                f"{where}: argument {i}=list of {len(a)}; {rule.statement} (NKI {version} rule {rule.id}, "
                f"since NKI {rule.since}: aws-neuron-sdk:{rule.source})"
            )
