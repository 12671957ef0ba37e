"""The package's layers, as its imports show them: each layer imports only the layers below it, and no file imports
another file's private (underscore) names."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "topk_lightning"

#: layer -> the project layers its files may import (besides their own)
ALLOWED = {
    "errors": set(),
    "atomic": set(),
    "ops": set(),
    "patching": {"ops", "errors"},
    "data": {"errors", "atomic"},
    "modules": {"patching", "errors", "atomic"},
    "callbacks": {"errors", "atomic"},
    "inference": {"data", "modules", "errors"},
    "cli": {"ops", "patching", "data", "modules", "callbacks", "errors", "atomic", "__init__"},
    "__init__": {"ops", "patching"},
}


def _layer(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py") if len(relative.parts) > 1 else relative.stem


def _project_imports(path: Path):
    """(imported module path, names) for every ``topk_lightning`` import in the file, wherever it sits."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("topk_lightning"):
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("topk_lightning"):
                    yield alias.name, []


def _target_layer(module: str, names: list[str]) -> set[str]:
    parts = module.split(".")
    if len(parts) > 1:
        return {parts[1]}
    return set(names) or {"__init__"}  # "from topk_lightning import ops" names the layer it takes


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path):
    layer = _layer(path)
    assert layer in ALLOWED, f"{path}: new top-level module; add it to ALLOWED"
    for module, names in _project_imports(path):
        for target in _target_layer(module, names):
            assert target == layer or target in ALLOWED[layer], f"{path.relative_to(PACKAGE)} imports {module}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_names_across_files(path):
    relative = str(path.relative_to(PACKAGE))
    for module, names in _project_imports(path):
        for name in names:
            if name.startswith("_"):
                pytest.fail(f"{relative} imports the private name {name} from {module}: make it a public helper")
