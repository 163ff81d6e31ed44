"""The real stack, end to end: a private Kafka + PostgreSQL started, used, restarted, stopped."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import uuid
from collections.abc import Iterator

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from pydantic import SecretStr

from cbtctl.commands import stack as stack_command
from cbtctl.stack import manager
from cbtctl.stack.kafka import Kafka
from cbtctl.stack.service import pid_alive
from cbtstream.config import Settings
from schemas.topics import ALL_TOPICS

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(stack_settings: Settings) -> Iterator[Settings]:
    """The private stack's settings, with a password that needs SQL quoting; always torn down."""
    pg = stack_settings.postgres.model_copy(update={"password": SecretStr("p'w\"d \\x")})
    settings = stack_settings.model_copy(update={"postgres": pg})
    try:
        yield settings
    finally:
        manager.down(settings, echo=lambda _line: None)  # never leave a broker behind


async def _roundtrip(settings: Settings, payload: bytes) -> bytes:
    """Create a topic, produce one message, consume it back from the beginning."""
    bootstrap = settings.kafka.bootstrap_servers
    topic = f"stacktest-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    async with AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all") as producer:
        await producer.send_and_wait(topic, payload, key=b"k")
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=topic
    )
    async with consumer:
        msg = await asyncio.wait_for(consumer.getone(), timeout=30)
    assert msg.value is not None
    return msg.value


async def _auto_create_refused(settings: Settings) -> bool:
    """True if producing to an unknown topic fails (auto.create.topics.enable=false)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers, request_timeout_ms=3000
    )
    await producer.start()
    try:
        await asyncio.wait_for(producer.send_and_wait("no-such-topic-typo", b"x"), timeout=5)
    except (KafkaError, TimeoutError):
        return True
    finally:
        await producer.stop()
    return False


async def _select_one(settings: Settings, password: str | None = None) -> int:
    kwargs = settings.postgres.connect_kwargs()
    if password is not None:
        kwargs["password"] = password
    conn = await asyncpg.connect(**kwargs, timeout=10)
    try:
        return int(await conn.fetchval("select 1"))
    finally:
        await conn.close()


def _status_exit_code(settings: Settings) -> int:
    args = argparse.Namespace(action="status", json=True)
    return stack_command.run(args, settings)


def test_stack_lifecycle(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    reports = manager.up(settings, echo=lines.append)
    assert [r.name for r in reports] == [cls.name for cls in manager.SERVICES]
    assert all(r.started for r in reports)
    assert any(line.startswith("topics: created") for line in lines)
    print("start times:", {r.name: round(r.seconds, 1) for r in reports})

    statuses = manager.status(settings)
    assert all(s.running and s.ready for s in statuses), statuses
    pids = {s.name: s.pid for s in statuses}
    assert _status_exit_code(settings) == 0
    assert settings.postgres.password.get_secret_value() not in capsys.readouterr().out

    # Kafka: a byte-exact round trip, the catalogue's topics, and no silent auto-creation.
    payload = b"\x00cbt\xffstream" + uuid.uuid4().bytes
    assert asyncio.run(_roundtrip(settings, payload)) == payload
    assert asyncio.run(_auto_create_refused(settings))

    # A console tool on the same classpath answers, with nothing but topic names on stdout.
    kafka_topics = Kafka(settings).bin_dir / "kafka-topics"
    out = subprocess.run(
        [str(kafka_topics), "--bootstrap-server", settings.kafka.bootstrap_servers, "--list"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.split()
    assert {spec.full_name("") for spec in ALL_TOPICS} <= set(out)
    assert all(not line.startswith("[") for line in out)  # no log4j lines on stdout

    # PostgreSQL: the application role logs in over TCP with its password, and only with it.
    assert asyncio.run(_select_one(settings)) == 1
    with pytest.raises(asyncpg.InvalidPasswordError):
        asyncio.run(_select_one(settings, password="wrong"))

    # up again: nothing restarted, still ready.
    again = manager.up(settings, echo=lines.append)
    assert not any(r.started for r in again)
    assert {s.name: s.pid for s in manager.status(settings)} == pids

    manager.down(settings, echo=lines.append)
    statuses = manager.status(settings)
    assert not any(s.running or s.ready for s in statuses), statuses
    assert not any(pid_alive(pid) for pid in pids.values() if pid is not None)
    assert _status_exit_code(settings) == 1
    manager.down(settings, echo=lines.append)  # twice is fine
