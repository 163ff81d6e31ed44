"""The base of every stack service: a background process with a pid file, a log file and a
readiness probe.

``start()`` is idempotent (a live pid means running), ``stop()`` signals only the pid this stack
wrote (never a process it did not start) and is safe to call twice, and ``wait_ready()`` polls the
service's own probe until it really answers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cbtstream.config import Settings
from cbtstream.errors import StackError


@dataclass(frozen=True)
class ServiceStatus:
    """What ``cbtstream stack status`` prints for one service."""

    name: str
    running: bool
    ready: bool
    pid: int | None
    detail: str = ""


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


class Service(ABC):
    """One background process of the stack."""

    #: Short name: pid file ``<state>/run/<name>.pid``, log file ``<state>/logs/<name>.log``.
    name: str = ""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = settings.stack.dir.resolve()
        self.pid_file = self.state_dir / "run" / f"{self.name}.pid"
        self.log_file = self.state_dir / "logs" / f"{self.name}.log"

    # -- to implement -------------------------------------------------------------------------
    @abstractmethod
    def install(self) -> None:
        """Make sure everything the service needs exists (packages, jars, binaries, data dirs)."""

    @abstractmethod
    def command(self) -> tuple[Sequence[str], Mapping[str, str] | None]:
        """The argv (and extra environment) that runs the service in the foreground."""

    @abstractmethod
    def probe(self) -> bool:
        """True when the service really answers (not merely when its process exists)."""

    # -- shared behaviour ---------------------------------------------------------------------
    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def start(self) -> None:
        if self.pid() is not None:
            return
        self.install()
        argv, extra_env = self.command()
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if extra_env:
            env.update(extra_env)
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(  # noqa: S603 - argv built by us, never from input
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.state_dir,
                start_new_session=True,  # survives the CLI; stop() signals the whole group
            )
        self.pid_file.write_text(f"{proc.pid}\n")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid() is None:
                raise StackError(
                    f"{self.name} exited during start-up; see {self.log_file}:\n{self.log_tail()}"
                )
            if self.probe():
                return
            time.sleep(0.25)
        raise StackError(f"{self.name} not ready after {timeout:.0f}s; see {self.log_file}")

    def stop(self, timeout: float = 30.0) -> None:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.1)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)

    def status(self) -> ServiceStatus:
        pid = self.pid()
        ready = pid is not None and self.probe()
        return ServiceStatus(self.name, pid is not None, ready, pid)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
