"""The import layers of sgsd_fast (docs/ARCHITECTURE.md), checked on the source with `ast`.

A module may import from its own layer or the layers below it, never from above; and neither the
module graph nor the graph of top-level packages has a cycle. Every import counts, also the lazy
ones inside functions: a lazy import that runs up the layers is still a dependency running up.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sgsd_fast"

#: Top-level component -> layer; lower layers never import higher ones.
LAYERS = {
    "_ext": 0, "ops": 0,                       # kernels, shared checks and constants
    "losses": 1,                               # per-token objectives on top of the ops
    "config": 2, "models": 2, "prompts": 2,    # leaf helpers: configuration, model access, prompt text
    "data": 3, "verify": 3, "skills": 3, "rollout": 3, "bench": 3,
    "train": 4,                                # the loop, the step, the objectives
    "commands": 5,                             # `sgsd-fast train | eval | skills | bench`
}


def module_name(path: Path) -> str:
    parts = ("sgsd_fast", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def component(module: str) -> str | None:
    """'sgsd_fast.train.step' -> 'train'; the package root itself has none."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(module: str) -> set[str]:
    """The sgsd_fast modules `module` imports (a name imported from a package counts as its submodule
    when one exists by that name)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if component(m) is not None and component(m) not in LAYERS)
    assert not missing, f"assign these modules' top-level package a layer in LAYERS: {missing}"


def test_no_import_runs_up_the_layers():
    upward = [f"{m} (layer {LAYERS[component(m)]}) imports {dep} (layer {LAYERS[component(dep)]})"
              for m, deps in GRAPH.items() if component(m) in LAYERS
              for dep in deps if component(dep) in LAYERS and LAYERS[component(dep)] > LAYERS[component(m)]]
    assert not upward, "imports running up the layers:\n" + "\n".join(sorted(upward))


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path, or None (iterative three-colour DFS)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return None


@pytest.mark.parametrize("level", ["module", "package"])
def test_no_import_cycles(level):
    if level == "module":
        graph = GRAPH
    else:
        graph = {}
        for m, deps in GRAPH.items():
            if component(m) is not None:
                graph.setdefault(component(m), set()).update(
                    component(d) for d in deps if component(d) not in (None, component(m)))
    cycle = _cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_check_sees_upward_and_cyclic_imports():
    """The scan itself: it resolves relative and from-imports, and finds a planted cycle."""
    assert "sgsd_fast.ops.common" in GRAPH["sgsd_fast.ops.linear_logprobs"]
    assert "sgsd_fast.skills.items" in GRAPH["sgsd_fast.skills.store"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
