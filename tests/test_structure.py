"""The package's import graph: no cycles, and the lower layers never import the package root or a layer above.

Layers as in docs/design.md ("Layers"): data, nets < diffusion < the checkpoint format, the backbone registry and
the runtime policies (idql_cm.checkpoint, backbones, policies) < modules < eval < cli. Top-level and function-level imports both count.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "idql_cm"

# rank of each layer; a module may import only ranks <= its own (equal rank: inside its own layer).
# lightning_compat is a leaf adapter over Lightning's private attributes (imports nothing of idql_cm but errors).
RANK = {"_version": 0, "errors": 0, "fileio": 0, "seeding": 0, "lightning_compat": 0, "nets": 1, "data": 1, "diffusion": 2,
        "checkpoint": 3, "backbones": 3, "policies": 3, "modules": 4, "eval": 5, "export": 5, "cli": 6, "__main__": 6}
CHECKED = ("eval", "data", "nets", "diffusion", "checkpoint", "backbones", "policies", "fileio", "seeding")

# known exceptions (none now; an entry needs a comment saying why)
ALLOWED: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
                for a in node.names:  # `from idql_cm.data import d4rl` names a submodule
                    full = f"{mod}.{a.name}"
                    targets.add(full if full in files else mod)
        graph[name] = {t for t in targets if t == "idql_cm" or t.startswith("idql_cm.")} - {name}
        graph[name] = {t for t in graph[name] if (name, t) not in ALLOWED}
    return graph


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt in graph and state.get(nxt) is None:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if state.get(node) is None:
            visit(node)


def test_lower_layers_import_nothing_above():
    graph = _graph()
    assert "idql_cm.data.d4rl" in graph and "idql_cm.eval.report" in graph  # the walk found the package
    bad = []
    for src, targets in sorted(graph.items()):
        layer = _layer(src)
        if layer not in CHECKED:
            continue
        for dst in sorted(targets):
            if dst == "idql_cm":
                bad.append(f"{src} -> idql_cm (the package root)")
            elif RANK.get(_layer(dst), 99) > RANK[layer]:
                bad.append(f"{src} -> {dst} ({_layer(dst)} is above {layer})")
    assert not bad, "upward imports: " + "; ".join(bad)


# docs/design.md "Names": each concept has one name; these are the retired ones (identifiers only, so prose such as
# "the ensemble's members" stays free)
RETIRED = {"num_members": "num_seeds", "steps_per_batch": "fused_steps", "steps_per_item": "fused_steps",
           "meta": "payload (a checkpoint's) or metadata (an exported file's)", "data_info": "data_payload"}


def test_retired_names_stay_retired():
    found = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.arg):
                names = [node.arg]
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            found += [f"{path.relative_to(PKG.parent)}:{node.lineno} {n} (use {RETIRED[n]})"
                      for n in names if n in RETIRED]
    assert len(list(PKG.rglob("*.py"))) > 30  # the walk saw the package
    assert not found, "retired names: " + "; ".join(found)
