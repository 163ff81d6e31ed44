"""Existing topics are checked against the catalogue on the real broker: ``cbtstream topics
create`` and the worker refuse topics that would break co-partitioning or retention (naming the
topic, the expected and actual values and the fix) and only warn about a longer retention.
Each test makes its mis-sized topics under its own topic prefix and deletes them afterwards."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from cbtctl.demo.processes import child_env
from cbtstream.config import Settings
from cbtstream.kafka import check_topics, client_kwargs, create_topics
from cbtstream.topic_check import TopicsMismatch
from schemas.topics import ALL_TOPICS, CONTROL_TOPICS
from tests.support import isolated_settings

pytestmark = pytest.mark.integration


async def _admin(settings: Settings) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    return admin


async def make_topics(settings: Settings, topics: dict[str, tuple[int, dict[str, str]]],
                      *, wait: bool = True) -> None:
    """Create topics (base name -> partitions, config) under the settings' prefix; with
    ``wait``, until the broker's metadata lists them (else a check may not see them yet)."""
    names = {settings.kafka.topic_prefix + name for name in topics}
    admin = await _admin(settings)
    try:
        await admin.create_topics([
            NewTopic(settings.kafka.topic_prefix + name, parts, 1, topic_configs=config)
            for name, (parts, config) in topics.items()])
        deadline = time.monotonic() + 30
        while wait and not names <= set(await admin.list_topics()):
            assert time.monotonic() < deadline, "topics not listed after 30 s"
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def our_topics(settings: Settings) -> set[str]:
    admin = await _admin(settings)
    try:
        prefix = settings.kafka.topic_prefix
        return {t.removeprefix(prefix) for t in await admin.list_topics()
                if t.startswith(prefix)}
    finally:
        await admin.close()


@pytest.fixture
def settings(stack_settings: Settings, tmp_path: Path) -> Iterator[Settings]:
    """Settings with a fresh topic prefix (2 partitions); its topics are deleted afterwards."""
    s = isolated_settings(stack_settings, tmp_path, streams={"remove_snapshots": False})
    yield s

    async def drop() -> None:
        admin = await _admin(s)
        try:
            names = [s.kafka.topic_prefix + t for t in await our_topics(s)]
            if names:
                await admin.delete_topics(names)
        finally:
            await admin.close()

    asyncio.run(drop())


def cbtstream(settings: Settings, *args: str, timeout: float = 120
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cbtctl.cli", *args], env=child_env(settings),
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_create_refuses_mis_sized_and_misconfigured_topics(settings: Settings) -> None:
    prefix = settings.kafka.topic_prefix
    asyncio.run(make_topics(settings, {
        "cbt.sync.planned": (3, {"cleanup.policy": "delete", "retention.ms": "-1"}),
        "cbt.changeid.committed": (2, {"cleanup.policy": "compact"}),
        "cbt.snapshot.taken": (2, {"retention.ms": "3600000"}),
    }))
    done = cbtstream(settings, "topics", "create")
    assert done.returncode == 1, done.stdout + done.stderr
    err = done.stderr
    # four: the compacted audit log also has the broker's 7-day retention, not "for ever"
    assert "cbtstream: error: 4 topic setting(s) differ from the catalogue" in err
    assert f"topic {prefix}cbt.sync.planned: the partition count is 3, expected 2" in err
    assert f"kafka-topics.sh --bootstrap-server {settings.kafka.bootstrap_servers}" in err
    assert "Never add partitions" in err and "re-hashes keys" in err
    assert (f"topic {prefix}cbt.changeid.committed: cleanup.policy is compact, expected delete"
            in err)
    assert (f"--entity-name {prefix}cbt.changeid.committed --add-config cleanup.policy=delete"
            in err)
    assert f"topic {prefix}cbt.changeid.committed: retention.ms is 7 days, expected for ever" in err
    assert f"topic {prefix}cbt.snapshot.taken: retention.ms is 1 hour, expected 30 days" in err
    # nothing was created next to the refused topics
    assert asyncio.run(our_topics(settings)) == {
        "cbt.sync.planned", "cbt.changeid.committed", "cbt.snapshot.taken"}
    # `topics check` says the same, line by line
    check = cbtstream(settings, "topics", "check")
    assert check.returncode == 1
    assert check.stdout.count("error: topic ") == 4
    assert check.stdout.count("missing: ") == len(ALL_TOPICS) + len(CONTROL_TOPICS) - 3


def test_longer_retention_is_a_warning(settings: Settings, caplog: pytest.LogCaptureFixture
                                       ) -> None:
    asyncio.run(make_topics(settings, {
        "cbt.sync.failed": (2, {"cleanup.policy": "delete", "retention.ms": "-1"})}))
    with caplog.at_level(logging.WARNING, "cbtstream.kafka"):
        created = asyncio.run(create_topics(settings.kafka))
    prefix = settings.kafka.topic_prefix
    assert len(created) == len(ALL_TOPICS) + len(CONTROL_TOPICS) - 1
    assert f"{prefix}cbt.sync.failed: retention.ms is for ever, expected 90 days" in caplog.text
    report = asyncio.run(check_topics(settings.kafka))
    assert report.missing == ()
    assert [(p.topic, p.error) for p in report.problems] == [(f"{prefix}cbt.sync.failed", False)]
    check = cbtstream(settings, "topics", "check")
    assert check.returncode == 0, check.stdout
    assert check.stdout.splitlines()[-1] == "0 error(s), 1 warning(s), 0 missing"


def test_worker_refuses_a_mis_sized_changelog(settings: Settings) -> None:
    """The worker checks its own topics too (the table's changelog here) before Faust starts."""
    asyncio.run(create_topics(settings.kafka))
    changelog = f"{settings.kafka.topic_prefix}{settings.streams.app_id}-disks-changelog"
    asyncio.run(make_topics(settings, {
        changelog.removeprefix(settings.kafka.topic_prefix): (3, {"cleanup.policy": "compact"})}))
    done = cbtstream(settings, "worker")
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"topic {changelog}: the partition count is 3, expected 2" in done.stderr
    assert "Never add partitions" in done.stderr


def test_a_topic_created_meanwhile_is_checked_too(settings: Settings) -> None:
    """A topic the listing did not show (a concurrent creator, metadata lag) comes back from
    the creation as "already exists": it is checked like the others."""
    made = {"cbt.sync.planned": (3, {"cleanup.policy": "delete", "retention.ms": "-1"})}
    listed = AIOKafkaAdminClient.list_topics

    async def then_another_creator(self: AIOKafkaAdminClient) -> list[str]:
        names = await listed(self)
        mp.setattr(AIOKafkaAdminClient, "list_topics", listed)
        await make_topics(settings, made, wait=False)  # created after the listing
        return names

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AIOKafkaAdminClient, "list_topics", then_another_creator)
        with pytest.raises(TopicsMismatch,
                           match=r"cbt\.sync\.planned: the partition count is 3, expected 2"):
            asyncio.run(create_topics(settings.kafka))
