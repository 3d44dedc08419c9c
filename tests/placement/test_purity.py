"""placement/ must stay pure: nothing from vmjobs, nothing from libvirt."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PLACEMENT = Path(__file__).resolve().parents[2] / "placement"
FORBIDDEN = ("vmjobs", "libvirt")


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", sorted(PLACEMENT.rglob("*.py")), ids=lambda p: p.name)
def test_module_imports_nothing_impure(path: Path) -> None:
    imported = _imports(ast.parse(path.read_text(), filename=str(path)))
    bad = [name for name in imported if name.split(".")[0] in FORBIDDEN]
    assert not bad, f"{path.name} imports {bad}"


def test_the_walk_sees_the_modules() -> None:
    assert len(list(PLACEMENT.rglob("*.py"))) >= 5


def test_the_public_api_resolves() -> None:
    import placement

    missing = [name for name in placement.__all__ if not hasattr(placement, name)]
    assert not missing
    assert {"Cluster", "Request", "plan_to_fit", "plan_rebalance", "parse_swf"} <= set(
        placement.__all__)
