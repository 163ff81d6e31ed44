"""The host's side of the stack: system tools, Debian packages, running commands, users.

The stack installs nothing without asking the host's package manager: a missing tool is installed
with ``apt-get`` when we are root (``apt-get update`` runs at most once per process), and reported
as a :class:`StackError` naming the Debian packages otherwise. Go is not a Debian package here
(it lives in ``/usr/local/go``): it is only checked and put on ``PATH``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbtstream.errors import StackError

#: Debian's PostgreSQL 15 programs (initdb, pg_ctl, postgres, psql, pg_isready).
PG_BIN = Path("/usr/lib/postgresql/15/bin")
#: Where Go is installed on the project's machines (not a Debian package).
GO_BIN = Path("/usr/local/go/bin")
#: PostgreSQL refuses to run as root; as root the stack runs it as this system user.
POSTGRES_OS_USER = "postgres"


@dataclass(frozen=True)
class Tool:
    """A program the project needs, and the Debian package that provides it."""

    name: str
    package: str
    #: An absolute path to check instead of looking ``name`` up on ``PATH``.
    path: Path | None = None
    #: A file pattern below ``/usr/lib`` to look for instead (shared objects such as nbdkit
    #: plugins live in an architecture folder and are not executable).
    lib_glob: str | None = None

    def present(self) -> bool:
        if self.lib_glob is not None:
            return any(Path("/usr/lib").glob(self.lib_glob))
        if self.path is not None:
            return os.access(self.path, os.X_OK)
        return shutil.which(self.name) is not None


JAVA = Tool("java", "default-jdk-headless")
MAVEN = Tool("mvn", "maven")
KCAT = Tool("kcat", "kcat")
POSTGRES = Tool("postgres", "postgresql", PG_BIN / "postgres")
PSQL = Tool("psql", "postgresql", PG_BIN / "psql")
NBDKIT = Tool("nbdkit", "nbdkit")
NBDCOPY = Tool("nbdcopy", "libnbd-bin")
#: qemu-nbd serves qcow2 files as NBD targets in the replica tests; qemu-img compares them.
QEMU_NBD = Tool("qemu-nbd", "qemu-utils")
#: nbdkit's Python plugin runs the project's stand-in for the vddk plugin
#: (devstack/nbdkit-vddk), which Debian 12 does not ship.
NBDKIT_PYTHON = Tool("nbdkit-python-plugin", "nbdkit-plugin-python",
                     lib_glob="*/nbdkit/plugins/nbdkit-python-plugin.so")
#: promtool checks and unit-tests the alert rules (deploy/monitoring); the same package's
#: prometheus scrapes a worker and a copier in the monitoring end-to-end test, which starts its
#: own on a free port. On a host with systemd apt also starts Debian's service (:9090, scraping
#: itself); the project does not use it (``systemctl disable --now prometheus``).
PROMTOOL = Tool("promtool", "prometheus")
PROMETHEUS = Tool("prometheus", "prometheus")
#: The deployment tests (tests/deploy): systemd-analyze verifies the units of deploy/systemd;
#: podman builds and runs the image, with runc (crun refuses hosts with hybrid cgroups), on a
#: base image made from Debian packages by mmdebstrap (no image registry needed).
SYSTEMD_ANALYZE = Tool("systemd-analyze", "systemd")
PODMAN = Tool("podman", "podman")
RUNC = Tool("runc", "runc")
MMDEBSTRAP = Tool("mmdebstrap", "mmdebstrap")
CONTAINER_TOOLS: tuple[Tool, ...] = (PODMAN, RUNC, MMDEBSTRAP)

#: Everything the project needs on a developer machine or CI, services or not (nbdkit and
#: libnbd-bin are used by the copier and its tests, qemu-utils by the NBD target tests,
#: prometheus by the monitoring tests, systemd and the container tools by the deployment
#: tests).
ALL_TOOLS: tuple[Tool, ...] = (JAVA, MAVEN, KCAT, POSTGRES, PSQL, NBDKIT, NBDCOPY, QEMU_NBD,
                               NBDKIT_PYTHON, PROMTOOL, PROMETHEUS, SYSTEMD_ANALYZE,
                               *CONTAINER_TOOLS)

_apt_updated = False


def is_root() -> bool:
    return os.geteuid() == 0


def missing_packages(tools: Iterable[Tool]) -> list[str]:
    """The Debian packages to install so every tool is present (sorted, no duplicates)."""
    return sorted({t.package for t in tools if not t.present()})


def ensure_tools(tools: Iterable[Tool] = ALL_TOOLS) -> list[str]:
    """Install the Debian packages of missing tools (as root) and return their names.

    Raises :class:`StackError` naming the packages when they are missing and we are not root.
    """
    global _apt_updated
    tools = tuple(tools)
    packages = missing_packages(tools)
    if not packages:
        return []
    if not is_root():
        raise StackError(
            "missing system packages: " + " ".join(packages)
            + f" (run: sudo apt-get install -y {' '.join(packages)})"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        run(["apt-get", "update"], env=env, timeout=600)
        _apt_updated = True
    run(["apt-get", "install", "-y", "--no-install-recommends", *packages], env=env, timeout=1200)
    still = missing_packages(tools)
    if still:
        raise StackError(f"packages installed but tools still missing: {' '.join(still)}")
    return packages


def ensure_go_on_path() -> str | None:
    """Put ``/usr/local/go/bin`` on this process's ``PATH``; returns a warning if Go is absent.

    Go builds the vSphere simulator; the Kafka and PostgreSQL services do not need it, so its
    absence is a warning, not an error.
    """
    if shutil.which("go") is not None:
        return None
    if (GO_BIN / "go").is_file():
        os.environ["PATH"] = f"{os.environ.get('PATH', '')}{os.pathsep}{GO_BIN}"
        return None
    return f"go not found (expected {GO_BIN / 'go'}); the vSphere simulator cannot be built"


@dataclass(frozen=True)
class OsUser:
    """The identity a service process runs as (``None`` fields: the current user)."""

    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def lookup(cls, name: str) -> OsUser:
        try:
            pw = pwd.getpwnam(name)
        except KeyError as exc:
            raise StackError(f"system user {name!r} does not exist") from exc
        return cls(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)

    def popen_kwargs(self) -> dict[str, Any]:
        """``subprocess`` arguments that drop privileges to this user in the child."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    user: OsUser | None = None,
    input_text: str | None = None,
    timeout: float = 300,
) -> str:
    """Run a command to completion and return its stdout; failures become :class:`StackError`.

    ``input_text`` goes to stdin (secrets are passed this way, never in ``argv``), and is never
    part of an error message.
    """
    kwargs: dict[str, Any] = {}
    if user is not None:
        kwargs.update(user.popen_kwargs())
    try:
        proc = subprocess.run(  # argv built by the stack, never from input
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )
    except FileNotFoundError as exc:
        raise StackError(f"{argv[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"{argv[0]} did not finish within {timeout:.0f}s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise StackError(f"{' '.join(argv[:3])} ... failed (exit {proc.returncode}):\n{tail}")
    return str(proc.stdout)


def make_traversable(path: Path) -> None:
    """Give "others" the execute bit on ``path`` and its parents (only where it is missing).

    The ``postgres`` system user must reach its data folder inside the state folder.
    """
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if not mode & 0o001:
            p.chmod(mode | 0o001)


def chown_tree(path: Path, user: OsUser) -> None:
    """Give ``user`` ownership of ``path`` and everything under it."""
    os.chown(path, user.uid, user.gid)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), user.uid, user.gid, follow_symlinks=False)
