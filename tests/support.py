"""Helpers for integration tests: per-test settings, subprocesses of our CLI, reading topics."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer

from cbtctl.demo.processes import Proc, child_env
from cbtstream.config import Settings
from cbtstream.kafka import client_kwargs, topic_name, topic_partitions
from schemas.codec import decode
from schemas.topics import TopicSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def isolated_settings(base: Settings, tmp: Path, **sections: dict[str, Any]) -> Settings:
    """A copy of ``base`` with a unique topic prefix, its own dirs and ports."""
    prefix = f"t{uuid.uuid4().hex[:10]}."
    data = base.model_dump()
    data["kafka"] |= {"topic_prefix": prefix, "partitions": 2}
    data["streams"] |= {"web_port": free_port(), "data_dir": tmp / "faust"}
    # metrics_port 0: no endpoint (the default port is one per host, and tests run copiers side
    # by side); a test that scrapes its copier sets a free port of its own
    data["copier"] |= {"target_root": tmp / "replicas", "state_dir": tmp / "copier",
                       "progress_interval_s": 0.5, "metrics_port": 0}
    for name, values in sections.items():
        data[name] |= values
    return Settings.model_validate(data)


settings_env = child_env


async def kafka_answers(settings: Settings) -> bool:
    """True if the broker of ``settings`` answers a metadata request within a few seconds."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka), request_timeout_ms=3000)
    try:
        await asyncio.wait_for(admin.start(), 5)
        await admin.list_topics()
        return True
    except Exception:
        return False
    finally:
        await admin.close()


async def read_topic(
    settings: Settings,
    spec: TopicSpec,
    *,
    until: Callable[[list[Any]], bool],
    timeout: float = 60.0,
    raw: bool = False,
    watch: tuple[Proc, ...] = (),
) -> list[Any]:
    """Read a topic from the beginning (no consumer group) until ``until(events)`` holds."""
    name = topic_name(spec, settings.kafka) if isinstance(spec, TopicSpec) else spec
    consumer = AIOKafkaConsumer(**client_kwargs(settings.kafka), enable_auto_commit=False,
                                group_id=None)
    await consumer.start()
    events: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        consumer.assign(await topic_partitions(consumer, name, timeout_s=timeout))
        await consumer.seek_to_beginning()
        while not until(events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: condition not met; got {len(events)} records")
            for proc in watch:
                if not proc.alive:
                    raise RuntimeError(f"{proc.log.name} exited:\n{proc.output()[-3000:]}")
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    events.append(r if raw else decode(r.value, key=r.key))
        return events
    finally:
        await consumer.stop()
