"""The four floors of the tree, checked on every import (function-level and ``TYPE_CHECKING``
ones too): an arrow only points down.

    floor 4  cbtctl/                         the operator's roof: imports anything
    floor 3  producers/ streams/ consumers/  the roles: never import each other
    floor 2  cbtstream/                      the shared ground: never imports a role or the roof
    floor 1  schemas/                        imports nothing of ours

And each third-party library that has one adapter is imported only there.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Top-level package -> the top-level packages of ours it may import (besides itself).
ALLOWED: dict[str, frozenset[str]] = {
    "schemas": frozenset(),
    "cbtstream": frozenset({"schemas"}),
    "producers": frozenset({"schemas", "cbtstream"}),
    "streams": frozenset({"schemas", "cbtstream"}),
    "consumers": frozenset({"schemas", "cbtstream"}),
    "cbtctl": frozenset({"schemas", "cbtstream", "producers", "streams", "consumers"}),
}
OURS = frozenset(ALLOWED)

#: Third-party library -> the only modules (or packages, ending in '/') that may import it.
ADAPTERS: dict[str, tuple[str, ...]] = {
    "faust": ("streams/",),
    "mode": ("streams/",),
    "pyVmomi": ("cbtstream/vsphere/adapter.py",),
    "pyVim": ("cbtstream/vsphere/adapter.py",),
    "asyncpg": ("consumers/audit/repository.py",),
    "aiohttp": ("cbtstream/metrics_http.py",),
    "prometheus_client": ("cbtstream/metrics.py", "cbtstream/metrics_http.py",
                          "streams/metrics.py"),
}


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, wherever it stands."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def _sources() -> list[Path]:
    return sorted(p for pkg in ALLOWED for p in (ROOT / pkg).rglob("*.py"))


def _breaks(allowed: dict[str, frozenset[str]], files: list[Path]) -> list[str]:
    out = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        own = rel.split("/", 1)[0]
        for line, module in _imports(path):
            top = module.split(".", 1)[0]
            if top in OURS and top != own and top not in allowed[own]:
                out.append(f"{rel}:{line} imports {module} ({own} may import only "
                           f"{sorted(allowed[own]) or 'nothing of ours'})")
            homes = ADAPTERS.get(top)
            if homes is not None and not any(
                    rel == h or (h.endswith("/") and rel.startswith(h)) for h in homes):
                out.append(f"{rel}:{line} imports {module}, whose adapter is {homes}")
    return out


def test_every_package_is_on_a_floor() -> None:
    tops = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert tops == OURS, "a new top-level package needs its floor in tests/unit/test_layers.py"


def test_imports_point_only_down() -> None:
    assert _breaks(ALLOWED, _sources()) == []


@pytest.mark.parametrize(("source", "module"), [
    ("cbtstream/x.py", "consumers.nbd.client"),   # the ground importing a role
    ("streams/x.py", "producers.orphans"),         # a role importing another role
    ("consumers/x.py", "cbtctl.cli"),              # a role importing the roof
    ("schemas/x.py", "cbtstream.config"),          # floor 1 importing floor 2
    ("consumers/x.py", "faust"),                   # Faust outside streams/
])
def test_a_new_break_is_found(tmp_path: Path, source: str, module: str,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    path = tmp_path / source
    path.parent.mkdir(parents=True)
    path.write_text(f"def f() -> None:\n    import {module}\n")
    assert len(_breaks(ALLOWED, [path])) == 1
