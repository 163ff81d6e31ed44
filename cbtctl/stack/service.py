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
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cbtctl.stack.system import OsUser
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


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a process (clock ticks since boot), or None if it is gone.

    Stored next to the pid so a pid recycled by another process is never mistaken for ours.
    """
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


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
            return fh.read().rsplit(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


#: Processes started by this Python process, by pid: kept so the ``Popen`` object is not
#: garbage-collected while the service runs (a ResourceWarning) and so ``stop()`` can reap it
#: instead of leaving a zombie in a long-lived caller such as the test runner.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class Service(ABC):
    """One background process of the stack."""

    #: Short name: pid file ``<state>/run/<name>.pid``, log file ``<state>/logs/<name>.log``.
    name: str = ""
    #: The signal that asks the service for a clean, prompt shutdown.
    stop_signal: signal.Signals = signal.SIGTERM

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

    # -- optional hooks -----------------------------------------------------------------------
    def run_as(self) -> OsUser | None:
        """The system user the process runs as; None for the current user."""
        return None

    def after_ready(self) -> None:  # noqa: B027 - an optional hook, deliberately empty
        """Idempotent set-up that needs the running service (users, databases); default none."""

    def endpoint(self) -> str:
        """How clients reach the service (no secrets), for ``stack up``/``status`` output."""
        return ""

    def restart_needed(self) -> str | None:
        """Why the running process no longer matches the settings (``stack up`` says so)."""
        return None

    # -- shared behaviour ---------------------------------------------------------------------
    def pid(self) -> int | None:
        """The pid of the process this stack started, if it is still that process and alive."""
        try:
            fields = self.pid_file.read_text().split()
            pid = int(fields[0])
        except (OSError, ValueError, IndexError):
            return None
        if not pid_alive(pid):
            return None
        if len(fields) > 1 and process_start_time(pid) != fields[1]:
            return None  # the pid was recycled by a process we did not start
        return pid

    def ports(self) -> list[int]:
        """TCP ports on ``stack.host`` the service listens on (checked free before a start)."""
        return []

    def _check_ports_free(self) -> None:
        for port in self.ports():
            with socket.socket() as sock:
                sock.settimeout(0.5)
                if sock.connect_ex((self.settings.stack.host, port)) == 0:
                    raise StackError(
                        f"{self.name}: port {port} on {self.settings.stack.host} is already in "
                        "use by a process this stack did not start (another cbtstream stack?); "
                        "stop it or choose other ports (CBTSTREAM_STACK__*_PORT)"
                    )

    def start(self, *, install: bool = True) -> None:
        """Start the process unless it runs already; ``install=False`` when the caller just did."""
        if self.pid() is not None:
            return
        self._check_ports_free()
        if install:
            self.install()
        argv, extra_env = self.command()
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if extra_env:
            env.update(extra_env)
        user = self.run_as()
        kwargs: dict[str, Any] = user.popen_kwargs() if user is not None else {}
        with open(self.log_file, "ab") as log:
            try:
                proc = subprocess.Popen(  # argv built by us, never from input
                    list(argv),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=self.state_dir,
                    start_new_session=True,  # survives the CLI; stop() signals the whole group
                    **kwargs,
                )
            except OSError as exc:
                raise StackError(f"cannot start {self.name} ({argv[0]}): {exc}") from exc
        _CHILDREN[proc.pid] = proc
        self.pid_file.write_text(f"{proc.pid} {process_start_time(proc.pid) or ''}\n")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pid() is None:
                raise StackError(
                    f"{self.name} exited during start-up; see {self.log_file}:\n{self.log_tail()}"
                )
            if self.probe():
                self.after_ready()
                return
            time.sleep(0.25)
        raise StackError(f"{self.name} not ready after {timeout:.0f}s; see {self.log_file}")

    def stop(self, timeout: float = 30.0) -> None:
        """Ask our process to stop (``stop_signal`` to its group), SIGKILL after ``timeout``."""
        pid = self.pid()
        if pid is None:
            self._reap_dead_child()
            self.pid_file.unlink(missing_ok=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, self.stop_signal)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.1)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            child.wait(timeout=10)
        self.pid_file.unlink(missing_ok=True)

    def _reap_dead_child(self) -> None:
        """Collect the exit status of a process of ours that died on its own (no zombie)."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        child = _CHILDREN.get(pid)
        if child is not None and child.poll() is not None:
            del _CHILDREN[pid]

    def status(self) -> ServiceStatus:
        pid = self.pid()
        ready = pid is not None and self.probe()
        return ServiceStatus(self.name, pid is not None, ready, pid, self.endpoint())

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
