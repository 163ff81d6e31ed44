"""Helpers for integration tests: per-test settings, subprocesses of our CLI, reading topics."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from cbtstream.config import Settings
from cbtstream.kafka import client_kwargs, topic_name
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
    data["copier"] |= {"target_root": tmp / "replicas", "progress_interval_s": 0.5}
    data["api"] |= {"port": free_port()}
    for name, values in sections.items():
        data[name] |= values
    return Settings.model_validate(data)


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that reproduce ``settings`` in a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBTSTREAM_")}
    for section in ("kafka", "postgres", "vsphere", "copier", "streams", "api", "stack"):
        model = getattr(settings, section)
        for field, value in model.model_dump(by_alias=True).items():
            if value is None:
                continue
            if hasattr(value, "get_secret_value"):
                value = value.get_secret_value()
            if isinstance(value, list | tuple):
                import json

                value = json.dumps([str(v) for v in value])
            env[f"CBTSTREAM_{section.upper()}__{field.upper()}"] = str(value)
    env["CBTSTREAM_LOG_FORMAT"] = "json"
    return env


class Proc:
    """A ``cbtstream`` subcommand running as a child process, with its output in a log file."""

    def __init__(self, args: list[str], settings: Settings, log: Path) -> None:
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cbtstream.cli", *args],
            env=settings_env(settings),
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (crash tests)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._fh.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


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
        parts = consumer.partitions_for_topic(name)
        deadline = time.monotonic() + timeout
        while not parts:
            await consumer._client.force_metadata_update()
            parts = consumer.partitions_for_topic(name)
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name} does not exist")
            await asyncio.sleep(0.2)
        consumer.assign([TopicPartition(name, p) for p in parts])
        await consumer.seek_to_beginning()
        while not until(events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: condition not met; got {len(events)} records")
            for proc in watch:
                if proc.proc.poll() is not None:
                    raise RuntimeError(f"{proc.log.name} exited:\n{proc.output()[-3000:]}")
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    events.append(r if raw else decode(r.value, key=r.key))
        return events
    finally:
        await consumer.stop()
