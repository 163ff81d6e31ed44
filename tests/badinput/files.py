"""File-tree snapshots: what a test run created or changed, and where any marked name appeared."""

from __future__ import annotations

import os
from pathlib import Path

#: Directories never walked when looking for marked names (huge, and not written by events).
SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache",
             ".pytest_cache"}

Tree = dict[str, tuple[int, int]]


def tree(root: Path) -> Tree:
    """relative path -> (size, mtime_ns) of every file and symlink under ``root``
    (directories as size -1)."""
    out: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            p = Path(dirpath) / name
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            size = -1 if p.is_dir() and not p.is_symlink() else st.st_size
            out[str(p.relative_to(root))] = (size, st.st_mtime_ns)
    return out


def changed(before: Tree, after: Tree) -> set[str]:
    """Paths created, removed or modified (directories only when created or removed)."""
    out = set(before) ^ set(after)
    for path in set(before) & set(after):
        if before[path][0] != -1 and before[path] != after[path]:
            out.add(path)
    return out


def marked(roots: list[Path], marker: str, *, depth: int | None = None) -> list[str]:
    """Every path under ``roots`` whose name contains ``marker`` (``depth`` 0: top level only)."""
    found = []
    for root in roots:
        base = len(root.parts)
        for dirpath, dirnames, filenames in os.walk(root):
            level = len(Path(dirpath).parts) - base
            found += [str(Path(dirpath) / n) for n in (*dirnames, *filenames) if marker in n]
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS
                           and (depth is None or level < depth)]
    return found
