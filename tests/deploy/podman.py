"""podman for the deployment tests: the tools (installed with apt when we are root), the images
(built with ``deploy/image/build.sh``, as an operator without an image registry would), and
containers of the image on the host's network.

The first build makes a Debian base image with mmdebstrap (about a minute; the tarball is kept
in ``.stack/deploy`` and reused) and builds every layer; later builds reuse podman's layer
cache (the dependency layer survives source edits), so only the source layers are rebuilt.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from cbtctl.stack import system
from cbtstream.errors import StackError

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "deploy" / "image" / "build.sh"
#: The production image, and the same with nbdkit's Python plugin for the project's stand-in
#: for the vddk plugin (tests/deploy/Dockerfile.standin).
IMAGE = "localhost/cbtstream:test"
#: The Dockerfile's build stage, tagged so that its layers (the dependencies) stay cached.
BUILD_IMAGE = "localhost/cbtstream-build:test"
STANDIN_IMAGE = "localhost/cbtstream-standin:test"
#: Build logs and the base image's tarball.
CACHE = REPO / ".stack" / "deploy"
#: What podman needs on the project's machines, for builds and containers alike: runc (crun
#: refuses their hybrid cgroup hierarchy), limits no higher than the current ones (raising them
#: is not permitted), and the host's network (the stack listens on 127.0.0.1).
HOST_OPTS = ("--runtime", "runc", "--network", "host",
             "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
#: Containers run with no capability at all: the image needs none.
RUN_OPTS = (*HOST_OPTS, "--cap-drop", "all")


def unavailable() -> str | None:
    """Why podman cannot run the deployment tests here, or None (tools installed if needed)."""
    if os.geteuid() != 0:
        return ("the container tests run rootful podman and install it with apt: run them as "
                "root (containers reach the stack on the host's network)")
    try:
        system.ensure_tools(system.CONTAINER_TOOLS)
    except StackError as exc:
        return f"podman cannot be installed here: {exc}"
    return None


def podman(*args: str, timeout: float = 120, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} ... exit {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}")
    return proc


def build(tag: str, *args: str, log: Path, podman_args: Sequence[str] = (),
          timeout: float = 1500) -> float:
    """``deploy/image/build.sh --tag TAG ARGS -- HOST_OPTS PODMAN_ARGS``; returns the seconds
    it took."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.run([str(BUILD), "--tag", tag, *args, "--", *HOST_OPTS, *podman_args],
                              stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                              check=False)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"building {tag} failed (exit {proc.returncode}; {log}):\n{tail}")
    return time.monotonic() - t0


def image_id(tag: str) -> str | None:
    proc = podman("image", "inspect", "-f", "{{.Id}}", tag, check=False)
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def replaced(tag: str, old: str | None) -> None:
    """Remove the image ``tag`` named before a rebuild (and the untagged layers only it used),
    so that reruns do not pile up images; the tagged ones keep the layer cache."""
    if old is not None and image_id(tag) != old:
        podman("rmi", old, check=False, timeout=300)


class Container:
    """One detached container of a cbtstream image (``podman run -d``)."""

    def __init__(self, name: str, image: str, args: Sequence[str], *, env: Mapping[str, str],
                 mounts: Sequence[str] = (), options: Sequence[str] = ()) -> None:
        self.name = name
        argv = ["run", "-d", "--name", name, *RUN_OPTS, *options]
        for k, v in env.items():
            argv += ["-e", f"{k}={v}"]
        for m in mounts:
            argv += ["-v", m]
        podman(*argv, image, *args, timeout=60)

    @property
    def running(self) -> bool:
        out = podman("inspect", "-f", "{{.State.Running}}", self.name, check=False)
        return out.stdout.strip() == "true"

    def logs(self) -> str:
        proc = podman("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def stop(self, timeout_s: int = 30) -> int:
        """SIGTERM (SIGKILL after ``timeout_s``); returns the exit code."""
        podman("stop", "-t", str(timeout_s), self.name, timeout=timeout_s + 30, check=False)
        out = podman("inspect", "-f", "{{.State.ExitCode}}", self.name)
        return int(out.stdout.strip())

    def remove(self) -> None:
        podman("rm", "-f", "-v", self.name, timeout=60, check=False)


def volume(name: str) -> Path:
    """Create a named volume; returns where its files are on this host."""
    podman("volume", "create", name)
    out = podman("volume", "inspect", "-f", "{{.Mountpoint}}", name)
    return Path(out.stdout.strip())

