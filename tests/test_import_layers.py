"""The package's parts import each other in one direction only (DESIGN.md, "Layers").

Every module of ``erasekit`` is parsed with ``ast`` and every import in it is collected: top-level
ones, the lazy ones inside functions, and dynamic ones (``importlib.import_module`` with a literal
or f-string name, or a string constant naming an erasekit module, as the lazy tables use). The
imports are folded into a graph between the package's parts (subpackages and top-level modules),
which must have no cycle and no edge that points up the declared layer order. A lazy import hides a
cycle from Python at import time, but not from a reader or from a refactoring, so it counts too.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import erasekit

PACKAGE = Path(erasekit.__file__).resolve().parent

# Top to bottom. A part may import parts of lower layers; within a layer only the listed
# sideways edges are allowed.
LAYERS = [
    ("erasekit",),                         # the public facade: lazy names for the API
    ("cli", "preview"),                    # shells over the API
    ("workflows",),                        # erase + evaluate together (sequential unlearning)
    ("eval", "attacks", "erase"),          # scoring, attacking, erasing: peers, none imports another
    ("config", "presets"),                 # shared: config base and help metadata; presets chosen by the model
    ("canvas",),                           # the embedded world: data, judge and CLIP networks, its presets
    ("pipelines",),                        # models, prompt and prefix encoding, image conversion, Edit
    ("_assets", "_io", "_profile", "errors", "stats"),
]
SIDEWAYS = {("cli", "preview"), ("_io", "errors"), ("_assets", "errors")}
# Allowed by the layer order but ruled out by the design: methods hold no canvas code.
FORBIDDEN = {("erase", "canvas")}

RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _root_constants() -> set[str]:
    """Names the facade binds to literals itself (``__version__``): reading them imports nothing."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    return {t.id for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for t in node.targets if isinstance(t, ast.Name)}


def _dynamic_name(node: ast.AST, module: str) -> str | None:
    """The module an ``import_module(...)`` argument names, or its known prefix for an f-string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        text = ""
        for value in node.values:
            if isinstance(value, ast.Constant):
                text += value.value
            elif isinstance(value.value, ast.Name) and value.value.id == "__name__":
                text += module
            else:
                break
        return text.rstrip(".") or None
    return None


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Every erasekit module that ``module`` imports, anywhere in its file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    package = module.split(".") if is_pkg else module.split(".")[:-1]
    constants = _root_constants()
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "erasekit"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "erasekit":
                continue
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    out.add(f"{target}.{alias.name}")
                elif not (target == "erasekit" and alias.name in constants):
                    out.add(target)
        elif isinstance(node, ast.Call) and node.args and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "import_module")):
            name = _dynamic_name(node.args[0], module)
            if name and name.split(".")[0] == "erasekit":
                out.add(name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "." in node.value \
                and node.value in known:
            out.add(node.value)
    out.discard(module)
    return out


def part_graph() -> dict[tuple[str, str], list[str]]:
    """(importing part, imported part) -> the module-level imports behind that edge."""
    modules = _modules()
    known = set(modules)
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for module, path in modules.items():
        for target in sorted(imports_of(module, path, known)):
            a, b = _part(module), _part(target)
            if a != b:
                edges[a, b].append(f"{module} -> {target}")
    return dict(edges)


def _cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one part (Tarjan)."""
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(graph) | {b for _, b in edges}):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_lazy_relative_and_dynamic_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import importlib\nfrom ..errors import ConfigError\n"
                   "def f():\n    from ..pipelines import generation\n    from .. import __version__\n"
                   "    importlib.import_module(f'erasekit.erase.{f}')\n    return 'erasekit.eval.judges'\n")
    known = {"erasekit", "erasekit.errors", "erasekit.pipelines", "erasekit.pipelines.generation",
             "erasekit.eval.judges", "erasekit.erase"}
    # read as if it were erasekit/attacks/m.py
    found = imports_of("erasekit.attacks.m", src, known)
    assert found == {"erasekit.errors", "erasekit.pipelines.generation", "erasekit.erase", "erasekit.eval.judges"}
    assert _cycles({("a", "b"): [], ("b", "c"): [], ("c", "a"): [], ("c", "d"): []}) == [["a", "b", "c"]]


def test_every_part_has_a_declared_layer():
    undeclared = sorted({_part(m) for m in _modules()} - set(RANK))
    assert not undeclared, f"declare the layer of {undeclared} in LAYERS of {__file__}"


def test_no_import_cycle_between_parts():
    edges = part_graph()
    cycles = _cycles(edges)
    detail = [line for comp in cycles for (a, b), lines in sorted(edges.items())
              if a in comp and b in comp for line in lines]
    assert not cycles, f"import cycles between {cycles}:\n" + "\n".join(detail)


def test_imports_point_down_the_layers():
    bad = []
    for (a, b), lines in sorted(part_graph().items()):
        if a not in RANK or b not in RANK:
            continue  # reported by test_every_part_has_a_declared_layer
        up = RANK[b] < RANK[a]
        sideways = RANK[b] == RANK[a] and (a, b) not in SIDEWAYS
        if up or sideways or (a, b) in FORBIDDEN:
            bad += lines
    assert not bad, "imports against the layer order (DESIGN.md, Layers):\n" + "\n".join(bad)
