"""The package layout keeps its layers: imports only go downward, and no two packages import each other.

Read from the source (every `import` / `from ... import` statement, at module or function level), so a new
import that goes up a layer or closes a cycle fails here before anyone has to notice it in a review.

Layers, lowest first (a module may import its own layer and the ones below):

    foundation  kvbench (the package's __init__), kvbench.registry: import nothing of kvbench
    engine      cache, attention, generation, rope, models, hub, measure, kernels/, quant/, layers/
    methods     the method registry and every method
    harness     runner, chunked, budget, fidelity, results, jsonl, sample, prompt, metrics, options
    scenarios   conversation, segments, edit (on the harness's public functions)
    tasks       task definitions and their data
    report      summaries, tables, figures, plots
    top         api, app, config, __main__, calibrate, lm_eval, integrations/
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kvbench"
LAYERS = ["foundation", "engine", "methods", "harness", "scenarios", "tasks", "report", "top"]
FOUNDATION = {"kvbench", "kvbench.registry"}
# A function-level import is allowed only for an optional dependency or a deliberate lazy load; each one that
# targets kvbench itself is listed here with its reason, so dodging a cycle cannot hide in a function body.
ALLOWED_FUNCTION_LEVEL_KVBENCH: dict[tuple[str, str], str] = {
    # Triton is optional: the Triton kernels are imported only where a kernel runs.
    ("kvbench.engine.kernels.decode_attention", "kvbench.engine.kernels.triton_decode_attention"): "triton",
    ("kvbench.engine.kernels.packed_decode", "kvbench.engine.kernels.triton_decode_attention"): "triton",
    ("kvbench.engine.kernels.packed_decode", "kvbench.engine.kernels.triton_packed_decode"): "triton",
    ("kvbench.engine.kernels.window_scores", "kvbench.engine.kernels.triton_window_scores"): "triton",
    ("kvbench.engine.attention", "kvbench.engine.kernels.decode_attention"): "triton is optional",
    ("kvbench.engine.attention", "kvbench.engine.kernels.packed_decode"): "triton is optional",
    # lm-eval is an optional extra: its adapter is imported only by `python -m kvbench.lm_eval`.
    ("kvbench.lm_eval", "kvbench.integrations.lm_eval"): "lm-eval is optional",
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str:
    if module in FOUNDATION:
        return "foundation"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS[1:-1]:
        return parts[1]
    return "top"


def imports(path: Path, root: Path = PACKAGE) -> list[tuple[str, bool, int]]:
    """(imported kvbench module, at function level, line) for every import statement of the file."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    function_nodes = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from kvbench.x import y` where y is a submodule imports kvbench.x.y
            targets = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_module = (root.parent / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    root.parent / Path(*sub.split("."))
                ).is_dir()
                targets.append(sub if is_module else target)
        else:
            continue
        for target in targets:
            if target == "kvbench" or target.startswith("kvbench."):
                found.append((target, id(node) in function_nodes, node.lineno))
    return found


def all_imports(root: Path = PACKAGE) -> dict[str, list[tuple[str, bool, int]]]:
    return {module_name(path, root): imports(path, root) for path in sorted(root.rglob("*.py"))}


def test_every_module_has_a_layer():
    """The package's folders are exactly the layers (a new folder must be placed in the order above)."""
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert folders == {"engine", "methods", "harness", "scenarios", "tasks", "report", "integrations"}


def upward_imports(root: Path = PACKAGE) -> list[str]:
    upward = []
    for module, targets in all_imports(root).items():
        here = LAYERS.index(layer_of(module))
        for target, _, line in targets:
            if LAYERS.index(layer_of(target)) > here:
                upward.append(f"{module}:{line} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    return upward


def test_imports_only_go_downward():
    assert upward_imports() == []


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycle():
    """No two modules (and so no two packages, given the layer order) import each other, even indirectly."""
    graph: dict[str, set[str]] = defaultdict(set)
    for module, targets in all_imports().items():
        for target, _, _ in targets:
            if target != module:
                graph[module].add(target)
    assert import_cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]


def test_no_function_level_import_dodges_a_cycle():
    """Function-level imports of kvbench modules are only the listed, justified lazy loads."""
    hidden = []
    for module, targets in all_imports().items():
        for target, function_level, line in targets:
            if function_level and (module, target) not in ALLOWED_FUNCTION_LEVEL_KVBENCH:
                hidden.append(f"{module}:{line} imports {target} inside a function")
    assert hidden == []


def test_the_checker_sees_upward_and_function_level_imports(tmp_path):
    """The rules are not vacuous: on a made-up package, an engine module importing a method (at module level) and
    a harness module importing a scenario inside a function are both reported."""
    root = tmp_path / "kvbench"
    for folder in ("engine", "methods", "harness", "scenarios"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "methods" / "snap.py").write_text("X = 1\n")
    (root / "scenarios" / "talk.py").write_text("Y = 1\n")
    (root / "engine" / "cache.py").write_text("from kvbench.methods.snap import X\n")
    (root / "harness" / "runner.py").write_text("def run():\n    from kvbench.scenarios import talk\n")
    found = all_imports(root)
    assert found["kvbench.engine.cache"] == [("kvbench.methods.snap", False, 1)]
    assert found["kvbench.harness.runner"] == [("kvbench.scenarios.talk", True, 2)]
    assert upward_imports(root) == [
        "kvbench.engine.cache:1 (engine) imports kvbench.methods.snap (methods)",
        "kvbench.harness.runner:2 (harness) imports kvbench.scenarios.talk (scenarios)",
    ]
