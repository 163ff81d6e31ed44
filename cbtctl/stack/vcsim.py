"""The vSphere simulator with CBT (``devstack/vcsim``, govmomi v0.52.0) as a stack service.

``install`` builds the Go program into ``<state>/bin/vcsim-cbt`` (skipped while the binary is
newer than every source file; Go's build cache makes a rebuild after an edit take seconds).
Layout under the state folder::

    bin/vcsim-cbt       the binary
    vcsim/              its data: datastores/, frozen/ (NBD exports), cert.pem, vcsim.json
    logs/vcsim.log      its log, and nbdkit's

The simulator speaks HTTPS with a self-signed certificate written to ``vcsim/cert.pem``; point
``vsphere.cafile`` at it to keep verification on (or set ``vsphere.insecure=true``). The side
channel is ``https://127.0.0.1:<port>/cbt``; the NBD address is in ``vcsim/vcsim.json``.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from cbtctl.stack.service import Service
from cbtstream.config import Settings
from cbtstream.errors import StackError

#: The Go module (found next to the package in a source checkout; not shipped in wheels).
SOURCE_DIR = Path(__file__).resolve().parents[2] / "devstack" / "vcsim"
GO = Path("/usr/local/go/bin/go")


def _newest_source_mtime(src: Path) -> float:
    files = [*src.glob("*.go"), src / "go.mod", src / "go.sum"]
    return max(f.stat().st_mtime for f in files if f.exists())


class VcsimService(Service):
    """govmomi's simulator extended with CBT, frozen snapshot images and NBD exports."""

    name = "vcsim"

    def __init__(self, settings: Settings, *, port: int | None = None,
                 page_bytes: int | None = None, max_areas: int | None = None) -> None:
        super().__init__(settings)
        self.port = port if port is not None else settings.stack.vcsim_port
        self.host = settings.stack.host
        self.page_bytes = page_bytes
        self.max_areas = max_areas
        self.binary = self.state_dir / "bin" / "vcsim-cbt"
        self.data_dir = self.state_dir / "vcsim"
        self.cert_file = self.data_dir / "cert.pem"

    @property
    def sdk_url(self) -> str:
        return f"https://{self.host}:{self.port}/sdk"

    def ports(self) -> list[int]:
        return [self.port]

    @property
    def side_channel_url(self) -> str:
        return f"https://{self.host}:{self.port}/cbt"

    def endpoint(self) -> str:
        return f"{self.sdk_url} (cafile {self.cert_file}); side channel {self.side_channel_url}"

    def install(self) -> None:
        go = GO if GO.is_file() else Path("go")
        if not (SOURCE_DIR / "go.mod").is_file():
            raise StackError(f"simulator sources not found at {SOURCE_DIR}")
        if self.binary.is_file() and self.binary.stat().st_mtime >= _newest_source_mtime(
            SOURCE_DIR
        ):
            return
        self.binary.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
        try:
            proc = subprocess.run(
                [str(go), "build", "-o", str(self.binary), "."],
                cwd=SOURCE_DIR, env=env, capture_output=True, text=True, timeout=900,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StackError(f"go build of the simulator failed: {exc}") from exc
        if proc.returncode != 0:
            raise StackError(f"go build of the simulator failed:\n{proc.stderr[-4000:]}")

    def command(self) -> tuple[Sequence[str], Mapping[str, str] | None]:
        argv = [str(self.binary), "-dir", str(self.data_dir),
                "-listen", f"{self.host}:{self.port}", "-nbd-listen", f"{self.host}:0"]
        if self.page_bytes is not None:
            argv += ["-page-bytes", str(self.page_bytes)]
        if self.max_areas is not None:
            argv += ["-max-areas", str(self.max_areas)]
        vs = self.settings.vsphere
        # The simulator accepts exactly the configured login; env, not argv, keeps it out of ps.
        return argv, {"VCSIM_USERNAME": vs.username,
                      "VCSIM_PASSWORD": vs.password.get_secret_value()}

    def info(self) -> dict[str, object]:
        """``vcsim.json``: sdk, side_channel, nbd (host:port), cert, pid."""
        doc: dict[str, object] = json.loads((self.data_dir / "vcsim.json").read_text())
        return doc

    def probe(self) -> bool:
        """Ready when this run's ``vcsim.json`` exists and the side channel answers over TLS
        verified against the simulator's own certificate."""
        try:
            info = self.info()
            if info.get("pid") != self.pid():
                return False
            ctx = ssl.create_default_context(cafile=str(self.cert_file))
            with urllib.request.urlopen(
                f"{self.side_channel_url}/health", timeout=2, context=ctx
            ) as resp:
                return bool(json.loads(resp.read()).get("ok"))
        except (OSError, ValueError):
            return False
