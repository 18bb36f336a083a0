"""The model package's shape: a torch-free facade, and imports that go one way (no cycles)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import lance_ray.models.lance as lance

PACKAGE = Path(lance.__file__).parent


def _run(code: str) -> str:
    """Run `code` in a fresh interpreter that imports this checkout's lance_ray."""
    root = str(PACKAGE.parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          env=env).stdout


def test_importing_the_facade_does_not_import_torch() -> None:
    out = _run(
        "import json, sys\n"
        "import lance_ray.models.lance as m\n"
        "eager = {n: getattr(m, n) is not None for n in m.__all__ if n not in m._LAZY}\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'eager': eager}))\n"
    )
    result = json.loads(out)
    assert result["torch"] is False
    assert all(result["eager"].values())


def test_every_facade_name_resolves() -> None:
    for name in lance.__all__:
        assert getattr(lance, name) is not None, name
    from lance_ray.models.lance.pipeline import LancePipeline
    from lance_ray.models.lance.tiny import ensure_tiny_checkpoint, write_tiny_checkpoint

    assert lance.LancePipeline is LancePipeline
    assert lance.write_tiny_checkpoint is write_tiny_checkpoint
    assert lance.ensure_tiny_checkpoint is ensure_tiny_checkpoint
    assert set(lance.__all__) <= set(dir(lance))


def test_unknown_names_and_submodules() -> None:
    try:
        lance.no_such_name  # noqa: B018
    except AttributeError:
        pass
    else:
        raise AssertionError("expected AttributeError")
    from lance_ray.models.lance import preprocess  # a submodule still imports through the facade

    assert preprocess.__name__ == "lance_ray.models.lance.preprocess"


def _imports_of(path: Path) -> set[str]:
    """Sibling modules `path` imports, at any depth (lazy and TYPE_CHECKING imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lance_ray.models.lance."):
            found.add(node.module.split(".")[3])
    return found


def test_no_import_cycles_inside_the_model_package() -> None:
    modules = {p.stem: _imports_of(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(name):], name]))
        state[name] = "open"
        for dep in sorted(modules.get(name, ())):
            visit(dep, [*path, name])
        state[name] = "done"

    for name in sorted(modules):
        visit(name, [])


def test_torch_free_modules_do_not_import_torch() -> None:
    names = ["source", "presets", "settings", "media_rules", "checkpoint", "config"]
    out = _run(
        "import importlib, sys\n"
        f"for n in {names!r}:\n"
        "    importlib.import_module('lance_ray.models.lance.' + n)\n"
        "print('torch' in sys.modules)\n"
    )
    assert out.strip() == "False"
