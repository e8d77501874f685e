"""Read graphlora's imports and check them against the layers of ``docs/architecture.md``.

Every import counts, including the ones inside functions (a function-level import is still a
dependency; it only hides the cycle from the interpreter). Imports under ``if TYPE_CHECKING:``
do not count: they exist for annotations and never run.

The checker works on source text, so the tests can feed it a deliberately broken module and see
it fail. ``python tests/layering.py`` prints every finding.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "graphlora"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

#: Layers, bottom first. A module may import from its own layer and the layers below it.
#: Entries are module names or package prefixes (``graphlora.quant`` covers its submodules);
#: the longest matching entry decides.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", (
        "graphlora.errors", "graphlora.version", "graphlora.meta", "graphlora.collectives",
        "graphlora.scaling", "graphlora.validate", "graphlora.patterns",
    )),
    ("tensors", ("graphlora.quant",)),
    ("files", ("graphlora.io",)),
    ("graph", (
        "graphlora.graph_utils", "graphlora.site_ops", "graphlora.sites", "graphlora.branches", "graphlora.adapters", "graphlora.dora", "graphlora.lora_init",
        "graphlora.rules", "graphlora.rules_file", "graphlora.trace", "graphlora.training_mode",
        "graphlora.batches", "graphlora.data", "graphlora.diff", "graphlora.signature",
        "graphlora.block_split", "graphlora.activation_checkpointing", "graphlora.op_kinds",
        "graphlora.kv_cache", "graphlora.meta_buffers",
    )),
    ("passes", ("graphlora.passes",)),
    ("model", ("graphlora.model", "graphlora.call_graphs", "graphlora.hf_compat", "graphlora.model_contents",
               "graphlora.generation")),
    ("orchestration", (
        "graphlora.pipeline", "graphlora.checkpoint", "graphlora.calibration", "graphlora.train",
        "graphlora.workflows", "graphlora.distributed", "graphlora.recipes",
        "graphlora.model_source", "graphlora.pretrained",
    )),
    ("onnx", ("graphlora.onnx",)),
    ("edges", (
        "graphlora.cli", "graphlora.demo", "graphlora.testing", "graphlora.pytest_plugin",
        "graphlora.__main__", "graphlora",
    )),
)

#: Upward imports that are part of the design, with the reason. (importer, imported) pairs;
#: ``imported`` may be a package prefix.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    ("graphlora.model", "graphlora.checkpoint"): (
        "LoraModel.save_pretrained / load_adapter are the checkpoint layer's entry points on the "
        "model object, as PEFT's model calls its own save code; function-level, one way at import time"
    ),
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    in_function: bool


@dataclass(frozen=True)
class Finding:
    kind: str  # "upward" | "cycle" | "unplaced"
    text: str


def module_sources(root: Path = ROOT) -> dict[str, str]:
    """Module name -> source text of every ``.py`` file in the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path.read_text(encoding="utf-8")
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _function_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    return inside


def imports_of(name: str, source: str, modules: Iterable[str]) -> list[Import]:
    """The graphlora modules ``name`` imports, resolved to the most specific known module."""
    known = set(modules)
    tree = ast.parse(source)
    skip = _type_checking_nodes(tree)
    in_func = _function_nodes(tree)
    is_pkg = (ROOT.parent / Path(*name.split(".")) / "__init__.py").exists()
    found: dict[tuple[str, int], Import] = {}

    def resolve(target: str) -> str | None:
        while target and target not in known:
            if "." not in target:
                return None
            target = target.rsplit(".", 1)[0]
        return target or None

    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.append(full if full in known else base)
        for target in targets:
            if not target.startswith(PACKAGE):
                continue
            resolved = resolve(target)
            if resolved is None or resolved == name:
                continue
            found.setdefault((resolved, node.lineno), Import(name, resolved, node.lineno, id(node) in in_func))
    return list(found.values())


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            covers = module == entry or (entry != PACKAGE and module.startswith(entry + "."))
            if covers and len(entry) > best_len:
                best, best_len = index, len(entry)
    return best


def _allowed(imp: Import) -> bool:
    for (importer, imported), _reason in ALLOWED_UPWARD.items():
        if imp.importer == importer and (imp.imported == imported or imp.imported.startswith(imported + ".")):
            return True
    return False


def _cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def check(sources: Mapping[str, str]) -> list[Finding]:
    """Every upward import (not in ALLOWED_UPWARD), every cycle and every module with no layer."""
    findings: list[Finding] = []
    graph: dict[str, set[str]] = {name: set() for name in sources}
    for name, source in sources.items():
        own = layer_of(name)
        if own is None:
            findings.append(Finding("unplaced", f"{name} belongs to no layer (add it to LAYERS)"))
            continue
        for imp in imports_of(name, source, sources):
            target_layer = layer_of(imp.imported)
            allowed = _allowed(imp)
            if not allowed:
                graph[name].add(imp.imported)
            if target_layer is not None and target_layer > own and not allowed:
                where = "inside a function" if imp.in_function else "at module level"
                findings.append(Finding(
                    "upward",
                    f"{name}:{imp.line} imports {imp.imported} {where}: layer "
                    f"'{LAYERS[own][0]}' may not import from '{LAYERS[target_layer][0]}'",
                ))
    for component in _cycles(graph):
        findings.append(Finding("cycle", "import cycle: " + " -> ".join(component)))
    return findings


def main() -> int:
    findings = check(module_sources())
    for f in findings:
        print(f"{f.kind}: {f.text}")
    print(f"{len(findings)} finding(s)")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
