"""The packages' layers: ``shared`` depends on nothing of ours, the two daemons not on each other, and
nothing below ``lukewarm`` (the CLI, ``lukewarm dev``, the client) imports it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"shared", "ingress", "runtime_proxy", "lukewarm", "loadtests", "tests"}
ALLOWED = {
    "shared": {"shared"},
    "ingress": {"ingress", "shared"},
    "runtime_proxy": {"runtime_proxy", "shared"},
    "lukewarm": {"lukewarm", "shared", "ingress", "runtime_proxy"},
}


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    wrong = {str(path.relative_to(ROOT)): sorted(imported_packages(path) - ALLOWED[package])
             for path in sorted((ROOT / package).glob("*.py"))}
    assert {path: names for path, names in wrong.items() if names} == {}
