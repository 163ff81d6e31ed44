"""Pipeline processes (``cbtstream worker``, ``cbtstream copier``) as child processes, each with
its output in a log file. Used by the demo and the end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from cbtstream.config import Settings, to_env


def child_env(settings: Settings) -> dict[str, str]:
    """This process's environment with every ``CBTSTREAM_*`` variable replaced by ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBTSTREAM_")}
    env.update(to_env(settings))
    env["CBTSTREAM_LOG_FORMAT"] = "json"
    return env


class Proc:
    """One ``cbtstream`` subcommand in its own process group."""

    def __init__(self, args: list[str], settings: Settings, log: Path) -> None:
        self.args = args
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cbtctl.cli", *args],
            env=child_env(settings),
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (crash tests)."""
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._fh.close()

    def stop(self, timeout: float = 20) -> None:
        if self.alive:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._fh.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")
