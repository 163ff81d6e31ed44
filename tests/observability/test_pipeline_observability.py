"""Metrics and structured logs of the real worker and copier over two replication cycles of a
two-disk simulator VM (the second with one disk's CBT reset), plus one malformed record on each
of their input topics.

Logs in scope: every JSON line of a ``cbtstream.*`` logger. Each must carry ``disk_key`` unless
it is one of the documented process-level messages in :data:`PROCESS_LEVEL` (start-up, a
record that could not be decoded and so has no disk, a VM-level snapshot removal). Lines of
Faust, mode and aiokafka (their own loggers, WARNING and above) are out of scope: they describe
the process, not a disk.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cbtctl.demo.run import stack_settings
from cbtctl.demo.scenario import Scenario, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from cbtstream.config import Settings
from cbtstream.kafka import Publisher, topic_name
from cbtstream.vsphere.simctl import SimulatorControl
from schemas.topics import DEADLETTER, SNAPSHOT_TAKEN, SYNC_PLANNED
from tests.e2e.conftest import Pipeline
from tests.support import free_port, read_topic

pytestmark = pytest.mark.integration

#: ``cbtstream.*`` messages about the process or a whole VM, not one disk (no ``disk_key``).
PROCESS_LEVEL = {
    "metrics endpoint listening",  # copier start-up
    "dead letter",  # the record could not be decoded: there is no trustworthy disk key
    "snapshot removed",  # one VM snapshot, all its disks: carries vm_snapshot instead
    "snapshot removal failed",
    "snapshot removal crashed",
    "could not record a snapshot removal",
    "offset commit failed",
    # the planner's fence book (streams/fences.py): fences are about scopes, not one disk
    "fence book ready",
    "fence",
    "fence book: reading again",
    "fence topic missing; planning without fences",
    "not a fence record",
    # the failover hold book (streams/holds.py): holds are about VMs, not one disk
    "hold book ready",
    "hold",
    "hold book: reading again",
    "hold topic missing; planning without holds",
    "not a hold record",
    # the snapshot removals' sweep (streams/app.py): a count over the worker's partitions
    "snapshot removals retried",
    # the planner worker's process and partition-level lines (streams/worker.py, recovery.py,
    # timeouts.py, watchdog.py, app.py)
    "stopping",
    "clean stop took longer than the deadline; exiting now (uncommitted inputs are "
    "redelivered to the next worker)",
    "cleared stale read offsets of newly assigned partitions",
    "silent syncs found",
    "source records skipped",
    "source partition stalled with records pending; re-reading it from its committed offset",
    # the worker's start-up warning that no API token is set (cbtctl/commands/worker.py)
    "api.token is not set: the HTTP API's read endpoints are open to local users and every "
    "store call (POST) is refused with 403; set CBTSTREAM_API__TOKEN to accept them",
}


def _metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(m: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return sum(v for (n, ls), v in m.items()
               if n == name and set(labels.items()) <= set(ls))


#: Terminal control sequences Faust's spinner writes even when stdout is not a terminal.
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08]")


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a process's output, parsed: all of them must be JSON log records."""
    out = []
    for raw in path.read_text(errors="replace").splitlines():
        line = _CONTROL.sub("", raw).strip()
        if line:
            out.append(json.loads(line))
    return out


@pytest.fixture
def obs_settings(kafka_settings: Settings, tmp_path: Path) -> Settings:
    s = stack_settings(kafka_settings)
    copier = s.copier.model_copy(update={"state_dir": tmp_path / "copier",
                                         "metrics_port": free_port()})
    return s.model_copy(update={"copier": copier})


async def test_metrics_and_disk_keys_in_logs(obs_settings: Settings, tmp_path: Path) -> None:
    settings = obs_settings
    sim = SimulatorControl.from_state(settings.stack.dir.resolve() / "vcsim")
    pipeline = Pipeline(settings, tmp_path / "logs")
    pipeline.start_copier()
    scenario = Scenario(settings, sim, tmp_path / "models", seed=11, timeout_s=90)
    scenario.check_alive.append(pipeline.check)
    copier_url = f"http://127.0.0.1:{settings.copier.metrics_port}/metrics"
    worker_url = f"http://127.0.0.1:{settings.streams.web_port}/metrics"
    try:
        vm = await scenario.create_vm(random_name("obs"), [4 * MiB, 2 * MiB])
        keys = [d.key for d in vm.disks]
        rng = scenario.rng
        c1 = await scenario.cycle(1, [w for d in vm.disks
                                      for w in initial_fill(rng, d.key, d.capacity)])
        c2 = await scenario.cycle(2, [w for d in vm.disks
                                      for w in scattered(rng, d.key, d.capacity)],
                                  reset=(keys[0],))
        assert all(r.verified for r in c1.rows + c2.rows)
        async with Publisher(settings.kafka) as pub:
            await pub.publish_raw(topic_name(SNAPSHOT_TAKEN, settings.kafka), b"k", b"{bad", [])
            await pub.publish_raw(topic_name(SYNC_PLANNED, settings.kafka), b"k", b"{bad", [])
        await read_topic(settings, DEADLETTER, until=lambda e: len(e) >= 2, timeout=30, raw=True,
                         watch=(pipeline.worker,))
        async with aiohttp.ClientSession() as http:
            async with http.get(copier_url) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                copier = _metrics(await r.text())
            async with http.get(worker_url) as r:
                assert r.status == 200
                worker = _metrics(await r.text())
    finally:
        await scenario.close()
        pipeline.stop()

    # copier: outcomes by type and reason, bytes, durations, dead letters, lag
    total = sum(d.capacity for d in vm.disks)
    assert _value(copier, "cbtstream_syncs_total", outcome="committed", replication_type="full",
                  reason="no_previous_commit") == 2
    assert _value(copier, "cbtstream_syncs_total", outcome="committed", replication_type="full",
                  reason="epoch_changed") == 1
    assert _value(copier, "cbtstream_syncs_total", outcome="committed",
                  replication_type="incremental", reason="previous_commit") == 1
    # the counter adds up exactly the bytes every commit says it copied
    copied = _value(copier, "cbtstream_bytes_copied_total")
    assert copied > 0 and copied == sum(r.bytes_copied for r in c1.rows + c2.rows)
    assert copied < 2 * total  # the incremental copied a part of its disk, not all of it
    assert _value(copier, "cbtstream_sync_duration_seconds_count") == 4
    assert _value(copier, "cbtstream_dead_letters_total", component="copier") == 1
    group = f"{settings.kafka.topic_prefix}cbtstream-copier"
    lag = {ls: v for (n, ls), v in copier.items() if n == "cbtstream_consumer_lag"}
    assert lag and all(dict(ls)["group"] == group and v == 0 for ls, v in lag.items())
    assert _value(copier, "cbtstream_disk_last_commit_timestamp_seconds") > 0
    # worker: decisions, the planner-side fallback (CBT reset), dead letters, lag
    assert _value(worker, "cbtstream_syncs_planned_total", replication_type="full") == 3
    assert _value(worker, "cbtstream_syncs_planned_total", replication_type="incremental") == 1
    assert _value(worker, "cbtstream_fallbacks_total", stage="planner",
                  reason="epoch_changed") == 1
    assert _value(worker, "cbtstream_dead_letters_total", component="planner") == 1
    assert any(n == "cbtstream_consumer_lag" for n, _ in worker)

    # logs: every cbtstream line about a disk names it
    disk_keys = {f"{vm.instance_uuid}/disk-{k}" for k in keys}
    seen: set[str] = set()
    for log in sorted((tmp_path / "logs").glob("*.log")):
        lines = [d for d in _json_lines(log) if str(d.get("logger", "")).startswith("cbtstream")]
        assert lines, f"{log.name}: no JSON log lines"
        for d in lines:
            if d["msg"] in PROCESS_LEVEL:
                continue
            assert "disk_key" in d, f"{log.name}: no disk_key in {d}"
            assert d["disk_key"] in disk_keys, d
            seen.add(d["disk_key"])
    assert seen == disk_keys
