"""The layout shows the architecture (issue 8): `vmjobs/virt/` is the libvirt adapter, the
only package that imports `libvirt`; `placement/` is pure and imports neither libvirt nor
anything of vmjobs. Every import counts, inside functions and under TYPE_CHECKING too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VMJOBS = ROOT / "vmjobs"
ADAPTER = VMJOBS / "virt"
PLACEMENT = ROOT / "placement"


def imported(source: str) -> set[str]:
    """The top-level package names a module's source imports (`import a.b`, `from a.b import
    c` -> "a"); relative imports count as the package they are in, i.e. not at all here."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def importers(root: Path, packages: set[str]) -> list[str]:
    """`path: package` for each module under `root` that imports one of `packages`."""
    return sorted(f"{path.relative_to(ROOT)}: {name}"
                  for path in root.rglob("*.py")
                  for name in imported(path.read_text()) & packages)


def test_the_scanner_sees_every_form_of_import() -> None:
    source = ("import os\n"
              "def f():\n    import libvirt as lv\n"
              "if TYPE_CHECKING:\n    from vmjobs.store import Store\n"
              "from . import sibling\n")
    assert imported(source) == {"os", "libvirt", "vmjobs"}


def test_only_the_adapter_imports_libvirt() -> None:
    outside = [line for line in importers(VMJOBS, {"libvirt"})
               if not line.startswith(str(ADAPTER.relative_to(ROOT)) + "/")]
    assert outside == [], "libvirt imported outside vmjobs/virt/ (use vmjobs.virt's " \
                          f"VirtError/Connection/Domain or an adapter function): {outside}"
    # and the adapter really is where libvirt is used (the scan found something to exempt)
    assert importers(ADAPTER, {"libvirt"})


def test_placement_is_pure() -> None:
    assert importers(PLACEMENT, {"libvirt", "vmjobs"}) == []


def test_every_package_is_in_the_wheel() -> None:
    """pyproject.toml lists the packages explicitly: a new one missing there is absent from
    every installed vmjobs but the editable one (found when the Ansible install lacked
    vmjobs.virt)."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(init.parent.relative_to(root).parts)
             for top in ("vmjobs", "placement") for init in (root / top).rglob("__init__.py")}
    assert found - listed == set()
