"""The layers of ARCHITECTURE.md, checked from the code's own imports (read with `ast`, nothing run).

* no import cycle inside `lance_ray` (function-level imports count: a lazy import is still a dependency);
* imports only go down the layers: front -> orchestration -> stages -> IO/spec -> model facade -> model;
* outside the model package, the model is reached through its facade and torch-free vocabulary only.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lance_ray"

# Layer of each module (by dotted-name prefix, longest match wins); a module may import its own layer
# or any layer with a larger number.
LAYERS = {
    "lance_ray.cli": 0,  # front
    "lance_ray.cluster": 1,  # orchestration
    "lance_ray.pipeline.runner": 1,
    "lance_ray.pipeline.planner": 1,
    "lance_ray.pipeline": 2,  # stages: sources, worker, backends, sinks
    "lance_ray.spec": 3,  # IO and spec
    "lance_ray.io": 3,
    "lance_ray.errors": 3,
    "lance_ray": 3,  # the package root (__version__)
    "lance_ray.models": 4,  # the model's facade and torch-free vocabulary ...
    "lance_ray.models.lance": 4,
}
# ... and its internals, which only the model package itself (and its facade) may import.
MODEL_PUBLIC = {
    "lance_ray.models", "lance_ray.models.lance", "lance_ray.models.lance.tasks", "lance_ray.models.lance.params",
    "lance_ray.models.lance.presets", "lance_ray.models.lance.settings", "lance_ray.models.lance.source",
    "lance_ray.models.lance.media_rules", "lance_ray.models.lance.pipeline", "lance_ray.models.lance.tiny",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of import nodes under `if TYPE_CHECKING:` (annotations only: not a runtime dependency)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> lance_ray modules it imports (a `from pkg import name` counts pkg.name when that is a module,
    else pkg itself)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def test_no_import_cycles_inside_lance_ray() -> None:
    assert _cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_only_go_down_the_layers() -> None:
    upward = [
        f"{module} (layer {_layer(module)}) imports {dep} (layer {_layer(dep)})"
        for module, deps in import_graph().items()
        for dep in sorted(deps)
        if _layer(dep) < _layer(module)
    ]
    assert upward == []


def test_outside_the_model_package_only_its_facade_is_imported() -> None:
    reaching_in = [
        f"{module} imports {dep}"
        for module, deps in import_graph().items()
        if not module.startswith("lance_ray.models")
        for dep in sorted(deps)
        if dep.startswith("lance_ray.models") and dep not in MODEL_PUBLIC
    ]
    assert reaching_in == []


def test_job_files_and_help_never_import_torch_or_ray() -> None:
    code = (
        "import sys; import lance_ray.spec, lance_ray.cli, lance_ray.pipeline.planner; "
        "from lance_ray.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_validate_plan_and_help_never_import_torch_nor_start_ray() -> None:
    """The commands themselves, as a user runs them (the plan counts the quickstart's input rows)."""
    job = PACKAGE.parent / "jobs" / "quickstart.yaml"
    code = (
        "import sys; from lance_ray.cli import main; "
        f"codes = [main(['validate', {str(job)!r}]), main(['plan', {str(job)!r}, '--gpus', '8', '--gpu-price', '2'])]; "
        "ray = sys.modules.get('ray'); "
        "print(codes, 'torch' in sys.modules, bool(ray and ray.is_initialized()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[0, 0] False False"
    help_run = subprocess.run([sys.executable, "-c", "import sys; from lance_ray.cli import main\n"
                               "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                               "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"],
                              capture_output=True, text=True, check=True)
    assert help_run.stdout.strip().splitlines()[-1] == "[]"
