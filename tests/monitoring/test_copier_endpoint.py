"""The copier's ``/metrics`` endpoint is on by default, on loopback (``copier.metrics_port``
9466); 0 turns it off; a port in use stops the copier with an error naming the setting."""

from __future__ import annotations

import socket
from typing import Any

import aiohttp
import pytest

from cbtstream.config import CopierSettings
from cbtstream.errors import ConfigError
from cbtstream.metrics import Metrics
from cbtstream.metrics_http import serve_consumer_metrics
from tests.support import free_port


class _NoPartitions:
    """A consumer with nothing assigned: the lag refresh has nothing to ask."""

    def assignment(self) -> set[Any]:
        return set()


def test_on_by_default_on_loopback() -> None:
    c = CopierSettings()
    assert (c.metrics_host, c.metrics_port) == ("127.0.0.1", 9466)


async def test_port_zero_is_off() -> None:
    async with serve_consumer_metrics(Metrics(), "127.0.0.1", 0, _NoPartitions(), "g") as server:
        assert server is None


async def test_serves_the_registry() -> None:
    m = Metrics()
    m.count_copies(lambda: 2, lambda: 1)
    port = free_port()
    async with serve_consumer_metrics(m, "127.0.0.1", port, _NoPartitions(), "g") as server:
        assert server is not None
        async with aiohttp.ClientSession() as http, http.get(server.url) as r:
            body = await r.text()
    assert 'cbtstream_copies{state="queued"} 2.0' in body
    assert 'cbtstream_copies{state="running"} 1.0' in body


async def test_a_port_in_use_names_the_setting() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=r"copier\.metrics_port"):
            async with serve_consumer_metrics(Metrics(), "127.0.0.1", port, _NoPartitions(),
                                              "g"):
                pass
