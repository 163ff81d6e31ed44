"""The Kafka broker stopped and restarted in the middle of a sync. The shared dev broker is
never touched: this test starts a private single-node Kafka (its own state dir and free ports,
the stack's own Kafka service class) and runs the worker and the copier against it, with the
shared vSphere simulator."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cbtctl.demo.scenario import files_equal, random_name
from cbtctl.stack.kafka import Kafka
from cbtstream.config import Settings, StackSettings
from tests.hardening.conftest import LaneFactory
from tests.hardening.harness import log_lines
from tests.stack.conftest import free_ports

# A private broker start-up, a stop and a restart take about 75 s, and the aiokafka clients of the
# stopped broker leave noisy background errors: this long infrastructure test runs in `make soak`.
pytestmark = [pytest.mark.integration, pytest.mark.soak]


@pytest.fixture
def private_kafka(kafka_settings: Settings) -> Iterator[Kafka]:
    state = Path(tempfile.mkdtemp(prefix="cbtstream-hardening-kafka-", dir="/tmp"))
    port, controller, sasl = free_ports(3)
    stack = StackSettings(dir=state, kafka_port=port, kafka_controller_port=controller)
    if "kafka_sasl_port" in StackSettings.model_fields:  # a listener the stack may add
        stack = stack.model_copy(update={"kafka_sasl_port": sasl})
    settings = Settings(stack=stack)
    kafka = Kafka(settings)
    try:
        kafka.start()
        kafka.wait_ready(120)
        yield kafka
    finally:
        kafka.stop()
        shutil.rmtree(state, ignore_errors=True)


async def test_broker_stopped_and_restarted_mid_sync(make_lane: LaneFactory,
                                                     private_kafka: Kafka,
                                                     kafka_settings: Settings) -> None:
    k = kafka_settings.kafka.model_copy(update={"bootstrap_servers": private_kafka.bootstrap})
    lane = await make_lane("kafka", 3, base=kafka_settings.model_copy(update={"kafka": k}))
    await lane.start(random_name("fault-kafka"))
    await lane.cycle(1)
    sc = lane.scenario
    assert sc.watcher is not None and lane.pipeline.copier is not None
    await sc.write(lane.workload(2))
    copier = lane.pipeline.copier
    before = len(log_lines(copier, "sync started"))
    events = await sc.snapshot()
    snap = events[0].vm_snapshot
    lane.auditor.current = snap
    while len(log_lines(copier, "sync started")) <= before:  # noqa: ASYNC110 - a log file
        await asyncio.sleep(0.02)
    t0 = time.monotonic()
    await asyncio.to_thread(private_kafka.stop)  # mid-copy
    down = time.monotonic() - t0
    await asyncio.sleep(3)
    await asyncio.to_thread(private_kafka.start, install=False)
    await asyncio.to_thread(private_kafka.wait_ready, 120)
    await sc.wait(snap, lane.keys)
    await lane.auditor.drain()
    out = sc.watcher.outcomes(snap)
    lane.cycles.append(type(lane.cycles[0])(2, snap, sc.watcher.plans(snap), out, 0.0))  # type: ignore[arg-type]
    await lane.cycle(3)
    assert lane.lineage_problems() == []
    assert lane.auditor.problems == [] and lane.auditor.failures == []
    assert all(files_equal(sc.replica(k), sc.model(k)) for k in lane.keys)
    print(f"broker stop took {down:.1f}s, then 3 s down, then restarted; "
          f"copier log: {len(log_lines(copier, 'sync committed'))} commits")
