"""``GET /metrics`` over HTTP (aiohttp, the one module that imports it), and the consumer lag
sampled at each scrape. Used by the copier (``copier.metrics_port``); the planner worker serves
its metrics from Faust's own web server (``streams.metrics``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any

from cbtstream.errors import ConfigError
from cbtstream.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("cbtstream.metrics")


#: How long one scrape waits for the coordinator's committed offset of a partition.
COMMITTED_TIMEOUT_S = 2.0


async def consumer_lag(consumer: Any) -> dict[tuple[str, int], int]:
    """Lag per assigned partition of an ``AIOKafkaConsumer``: the high watermark of the last
    fetch minus the group's committed offset (asked from the coordinator)."""
    lags: dict[tuple[str, int], int] = {}
    for tp in list(consumer.assignment()):
        end = consumer.highwater(tp)
        if end is None:
            continue
        try:
            async with asyncio.timeout(COMMITTED_TIMEOUT_S):
                committed = await consumer.committed(tp)
        except Exception:  # a rebalance or a slow coordinator: skip this scrape
            continue
        lags[(tp.topic, tp.partition)] = end - (committed or 0)
    return lags


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (aiohttp). ``refresh`` runs before each scrape (to
    sample values that are cheap to read only on demand, such as consumer lag)."""

    def __init__(self, metrics: Metrics, host: str, port: int,
                 refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._refresh = refresh
        self._runner: Any = None

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        if self._refresh is not None:
            try:
                await self._refresh()
            except Exception:
                log.warning("metrics refresh failed", exc_info=True)
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": CONTENT_TYPE})

    async def start(self) -> None:
        from aiohttp import web

        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        if self.port == 0:  # an ephemeral port: report the real one
            sockets = getattr(site._server, "sockets", None)
            if sockets:
                self.port = int(sockets[0].getsockname()[1])
        log.info("metrics endpoint listening", extra={"url": self.url})

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.cleanup()

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


@contextlib.asynccontextmanager
async def serve_consumer_metrics(metrics: Metrics, host: str, port: int, consumer: Any,
                                 group: str) -> AsyncIterator[MetricsServer | None]:
    """Serve ``metrics`` with the lag of ``consumer`` (an ``AIOKafkaConsumer`` in ``group``)
    refreshed on each scrape (``copier.metrics_port``); does nothing when ``port`` is 0. A port
    in use is a :class:`ConfigError` naming the setting: the endpoint is on by default, so a
    second copier on a host meets it first."""
    if not port:
        yield None
        return

    async def refresh() -> None:
        metrics.set_lag(group, await consumer_lag(consumer))

    server = MetricsServer(metrics, host, port, refresh)
    try:
        await server.start()
    except OSError as exc:
        raise ConfigError(
            f"the copier's metrics endpoint cannot listen on {host}:{port} ({exc.strerror}); "
            "is another copier running on this host? Give each its own copier.metrics_port "
            "(CBTSTREAM_COPIER__METRICS_PORT), or 0 for no endpoint") from exc
    try:
        yield server
    finally:
        await server.stop()
