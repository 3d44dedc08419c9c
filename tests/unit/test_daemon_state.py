"""The daemon's state changes only through its own methods (`vmjobs/daemon/core.py`): no
other module of vmjobs assigns to, or mutates, `active`, `waits`, `restoring`, `preempting`
or `dirty` of a daemon, changes a job's state with `<daemon>.store.transition` /
`.store.release`, or takes `<daemon>.store` under another name to do so."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vmjobs"
CORE = PACKAGE / "daemon" / "core.py"
STATE = frozenset({"active", "waits", "restoring", "preempting", "dirty", "releasing"})
MUTATORS = frozenset({"add", "discard", "remove", "pop", "popitem", "clear", "update",
                      "setdefault", "append", "extend", "insert"})
STORE_WRITES = frozenset({"transition", "release"})


def _state_attribute(node: ast.AST) -> str | None:
    """`x.active` (or `x.active[k]`) -> "active"."""
    if isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Attribute) and node.attr in STATE:
        # `self.waits` outside core.py is another class's own attribute (queue.Planner's)
        if isinstance(node.value, ast.Name) and node.value.id == "self":
            return None
        return node.attr
    return None


def _targets(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.Assign):
        return list(node.targets)
    if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        return [node.target]
    if isinstance(node, ast.Delete):
        return list(node.targets)
    return []


def violations(source: str) -> list[str]:
    """What `source` does to a daemon's state from outside its methods, one line each."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        for target in _targets(node):
            parts = target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]
            for part in parts:
                if (attr := _state_attribute(part)) is not None:
                    found.append((node.lineno, f"assigns .{attr}"))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if node.func.attr in MUTATORS and (attr := _state_attribute(owner)) is not None:
                found.append((node.lineno, f".{attr}.{node.func.attr}()"))
            if node.func.attr in STORE_WRITES and isinstance(owner, ast.Attribute) \
                    and owner.attr == "store":
                found.append((node.lineno, f".store.{node.func.attr}()"))
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute) \
                and node.value.attr == "store" and isinstance(node.value.value, ast.Name) \
                and node.value.value.id == "daemon":
            found.append((node.lineno,
                          f"daemon.store taken as {ast.unparse(node.targets[0])}"))
    return [f"line {line}: {what}" for line, what in sorted(found)]


def test_the_scan_finds_each_kind_of_change() -> None:
    source = """
daemon.active[job] = a
daemon.active.pop(job, None)
daemon.restoring.add(job)
daemon.preempting = None
daemon.waits = {}
daemon.dirty = False
del daemon.active[job]
daemon.store.transition(job, state, "x")
daemon.store.release(job)
store = daemon.store
store.transition(job, state, "y")  # another store (a mover's own): allowed
daemon.active.get(job).phase = 1  # an Active's own fields: not the daemon's
self.waits = 0  # another class's own attribute
"""
    assert [v.split(": ", 1)[1] for v in violations(source)] == [
        "assigns .active", ".active.pop()", ".restoring.add()", "assigns .preempting",
        "assigns .waits", "assigns .dirty", "assigns .active", ".store.transition()",
        ".store.release()", "daemon.store taken as store",
    ]


def test_only_the_core_changes_the_daemons_state() -> None:
    found = {
        str(path.relative_to(PACKAGE.parent)): hits
        for path in sorted(PACKAGE.rglob("*.py")) if path != CORE
        if (hits := violations(path.read_text()))
    }
    assert found == {}
