"""The versioned schema of the audit database: ``migrations/NNNN_<name>.sql``, applied in order.

Files are read when asked for, never at import time. A migration's checksum is recorded when it is
applied; an applied migration whose file changed afterwards is an error, not a silent skip.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    """One schema migration file."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return "sha256:" + hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Every migration of ``directory``, by version; refuses duplicate versions and stray files."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix != ".sql":
            continue
        m = _NAME_RE.match(path.name)
        if m is None:
            raise ValueError(f"migration file name {path.name!r} is not NNNN_<name>.sql")
        version = int(m[1])
        if version in found:
            raise ValueError(f"two migrations with version {version}")
        found[version] = Migration(version, m[2], path.read_text())
    return [found[v] for v in sorted(found)]
