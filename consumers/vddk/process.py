"""One running ``nbdkit``: start it, wait until it is ready, stop it.

Readiness is the pidfile: nbdkit writes it once its socket accepts connections. While waiting,
an nbdkit that exits (bad parameter, unreadable password file, plugin or library missing) is
reported with the error lines of its stderr, which goes to ``nbdkit.log`` in the export's
private folder (nbdkit never logs the password: it only ever sees ``-FD`` or ``+FILE``).

Stopping is SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`, and always reaps the process and
removes the folder; it is safe to call twice and runs even when the sync was cancelled. If the
copier itself dies, ``--exit-with-parent`` has the kernel end nbdkit. That signal follows the
*thread* that forked nbdkit, so processes are spawned from the event loop's thread (asyncio's
subprocess API), never from a worker thread that may exit first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from consumers.vddk.command import classify, render
from consumers.vddk.errors import VddkStartFailed, VddkUnavailable

log = logging.getLogger("cbtstream.vddk")

#: Seconds nbdkit gets to close its VDDK session after SIGTERM before it is killed.
STOP_GRACE_S = 5.0
_POLL_S = 0.02


class NbdkitProcess:
    """``await p.start()`` ... ``await p.stop()``; the folder ``run`` is owned by the process."""

    def __init__(self, argv: Sequence[str], run: Path, *, pass_fds: Sequence[int] = (),
                 what: str = "nbdkit") -> None:
        self.argv = list(argv)
        self.run = run
        self.pidfile = run / "nbdkit.pid"
        self.logfile = run / "nbdkit.log"
        self.what = what
        self._pass_fds = tuple(pass_fds)
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stderr(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    async def start(self, timeout_s: float) -> None:
        """Spawn nbdkit and wait for its pidfile (or its death, reported as an error)."""
        log.info("starting nbdkit", extra={"command": render(self.argv), "what": self.what})
        out = os.open(self.logfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                pass_fds=self._pass_fds, close_fds=True)
        except FileNotFoundError as exc:
            raise VddkUnavailable(f"{self.argv[0]} not found: install Debian's nbdkit "
                                  "(apt-get install nbdkit)") from exc
        finally:
            os.close(out)
        deadline = time.monotonic() + timeout_s
        proc = self._proc
        while True:
            if proc.returncode is not None:
                raise classify(self.stderr(), f"nbdkit for {self.what} exited "
                               f"({proc.returncode})")
            if _pidfile_names(self.pidfile, proc.pid):
                return
            if time.monotonic() > deadline:
                await self.stop()
                raise VddkStartFailed(f"nbdkit for {self.what} not ready after {timeout_s:.0f}s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), _POLL_S)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def stop(self) -> None:
        """End nbdkit (SIGTERM, then SIGKILL), reap it and remove its folder."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(proc.wait()), STOP_GRACE_S)
                except (TimeoutError, asyncio.CancelledError):
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                        await asyncio.wait_for(asyncio.shield(proc.wait()), STOP_GRACE_S)
                log.info("nbdkit stopped", extra={"what": self.what, "pid": proc.pid})
        finally:
            shutil.rmtree(self.run, ignore_errors=True)


def _pidfile_names(pidfile: Path, pid: int) -> bool:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return False
    return text == str(pid)


def make_private_dir(parent: Path, name: str) -> Path:
    """``parent/name`` created 0700 (parents 0700 too), refusing a symlink or foreign owner."""
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(parent)
    if not os.path.isdir(parent) or os.path.islink(parent) or st.st_uid != os.geteuid():
        raise VddkUnavailable(f"{parent} is not a folder of ours: refusing to put sockets there")
    os.chmod(parent, 0o700)
    path = parent / name
    path.mkdir(mode=0o700)
    return path
