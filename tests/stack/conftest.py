"""Fixtures for the stack tests: a second, private stack on free ports in a temp folder."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from cbtstream.config import (
    KafkaSettings,
    PostgresSettings,
    Settings,
    StackSettings,
    VSphereSettings,
)


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports the kernel says are free on 127.0.0.1 right now."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A fresh state folder under /tmp (whose parents the ``postgres`` user can traverse)."""
    path = Path(tempfile.mkdtemp(prefix="cbtstream-stack-test-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def stack_settings(state_dir: Path) -> Settings:
    """Settings of a private stack: its own folder and ports, clients pointed at them."""
    kafka_port, controller_port, pg_port, vcsim_port, sasl_port = free_ports(5)
    return Settings(
        stack=StackSettings(
            dir=state_dir,
            kafka_port=kafka_port,
            kafka_controller_port=controller_port,
            kafka_sasl_port=sasl_port,
            postgres_port=pg_port,
            vcsim_port=vcsim_port,
        ),
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{kafka_port}"),
        postgres=PostgresSettings(port=pg_port, user="stacktest", database="stacktest_db"),
        vsphere=VSphereSettings(url=f"https://127.0.0.1:{vcsim_port}/sdk", insecure=True),
    )
