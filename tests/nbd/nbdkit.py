"""Start real nbdkit servers for tests: a unix socket (or 127.0.0.1 TCP port) in a temp dir,
``--exit-with-parent`` and an explicit terminate so no process outlives a test."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

NBDKIT = shutil.which("nbdkit")
needs_nbdkit = pytest.mark.skipif(NBDKIT is None, reason="nbdkit is not installed")


def _nbdkit_has_tls() -> bool:
    if NBDKIT is None:
        return False
    try:
        out = subprocess.run([NBDKIT, "--dump-config"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "tls=yes" in out.splitlines()


needs_nbdkit_tls = pytest.mark.skipif(not _nbdkit_has_tls(),
                                      reason="nbdkit is not installed or built without TLS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def nbdkit(workdir: Path, *args: str, tcp: bool = False) -> Iterator[str]:
    """Run ``nbdkit <args>`` and yield its NBD URI."""
    assert NBDKIT is not None
    if tcp:
        port = free_port()
        where = ["-i", "127.0.0.1", "-p", str(port)]
        uri = f"nbd://127.0.0.1:{port}"
    else:
        sock = workdir / f"nbdkit-{os.getpid()}-{time.monotonic_ns()}.sock"
        where = ["-U", str(sock)]
        uri = f"nbd+unix:///?socket={sock}"
    proc = subprocess.Popen(
        [NBDKIT, "--exit-with-parent", "-f", *where, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"nbdkit exited: {err}")
            if tcp:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
            elif sock.exists():
                # bind() creates the file before listen(): ready only once a connect succeeds.
                with socket.socket(socket.AF_UNIX) as s:
                    if s.connect_ex(str(sock)) == 0:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError("nbdkit did not start")
            time.sleep(0.01)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
