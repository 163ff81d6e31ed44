"""A real Prometheus (Debian's binary) scrapes a real worker and copier of the local stack with
the production alert rules (``deploy/monitoring/prometheus/cbtstream-rules.yaml``), 1 s scrape
and evaluation intervals, on 127.0.0.1 with its own data directory. A two-disk simulator VM is
synced, one byte of a replica is flipped behind the copier, ``cbtstream verify`` finds it and
the next sync copies the disk in full (reason ``replica_mismatch``); one undecodable record is
published on ``cbt.snapshot.taken``.

Asserted:

* ``CbtstreamReplicaMismatch`` and ``CbtstreamDeadLetters`` fire (``/api/v1/alerts``, state
  ``firing``), and no other alert does (the ``... down`` alerts may be pending while the
  processes start; they need 2 minutes to fire);
* every PromQL expression of the dashboard (its variables expanded as in
  :data:`tests.monitoring.promql.VARIABLES`) and of the rules is evaluated by that Prometheus,
  a few seconds after the repair (so rates have two samples of the series it created). The
  rule, precisely:

  1. every vector selector an expression names (``tests.monitoring.promql.selectors``; a unit
     test proves they are all of its metric names) must exist: Prometheus returns series for
     it; or it returns none but the bare metric has series, carrying every label name the
     selector matches on (``outcome="failed"`` when no sync failed); or the metric has no series
     at all and the worker or the copier declares it (``# TYPE``) in its ``/metrics``: a
     labelled counter with nothing counted yet (no watchdog action, no patrol result), of which
     Prometheus keeps nothing, not even metadata;
  2. every dashboard expression returns series, unless one of its selectors returned none in 1
     (nothing counted yet); alert expressions may return none (they filter healthy values out).

  So a misspelt metric or label, a metric neither process serves, or a dashboard join that
  matches nothing fails the test (probed at the end, so the check is not vacuous).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from cbtctl.demo.processes import child_env
from cbtctl.demo.run import stack_settings
from cbtctl.demo.scenario import Scenario, random_name
from cbtctl.demo.workload import MiB, initial_fill, scattered
from cbtstream.config import Settings
from cbtstream.kafka import Publisher, topic_name
from cbtstream.vsphere.simctl import SimulatorControl
from schemas.topics import SNAPSHOT_TAKEN
from tests.e2e.conftest import Pipeline
from tests.monitoring.promql import (
    RULES,
    Expr,
    dashboard_expressions,
    prometheus,
    rule_expressions,
    selectors,
)
from tests.support import free_port

pytestmark = pytest.mark.integration

#: The alerts the induced failures fire; any other firing alert is a false positive.
EXPECTED = {"CbtstreamReplicaMismatch", "CbtstreamDeadLetters"}
#: Seconds after the repairing commit before the expressions are evaluated: a rate() over the
#: series it created needs two samples of them (1 s scrapes).
RATE_SAMPLES_S = 4.0
#: Suffixes a sample name adds to its family's name in the text exposition.
_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


class Prometheus:
    """``prometheus`` on 127.0.0.1:<free port>, scraping the worker and the copier under the job
    names the rules expect, evaluating the rules every second."""

    def __init__(self, tmp: Path, worker: str, copier: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "cbtstream-worker", "static_configs": [{"targets": [worker]}]},
                {"job_name": "cbtstream-copier", "static_configs": [{"targets": [copier]}]}],
        }
        path = tmp / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.log = tmp / "prometheus.log"
        self._fh = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [prometheus(), f"--config.file={path}", f"--storage.tsdb.path={tmp / 'prom-data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self._fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)

    async def wait_ready(self, http: aiohttp.ClientSession, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
            try:
                async with http.get(f"{self.url}/-/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError("prometheus not ready")

    async def query(self, http: aiohttp.ClientSession, promql: str) -> list[dict[str, Any]]:
        async with http.get(f"{self.url}/api/v1/query", params={"query": promql}) as r:
            body = await r.json()
        assert body["status"] == "success", (promql, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        if body["data"]["resultType"] == "scalar":
            return [{"value": result}]
        return result

    async def alerts(self, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
        async with http.get(f"{self.url}/api/v1/alerts") as r:
            body = await r.json()
        alerts: list[dict[str, Any]] = body["data"]["alerts"]
        return alerts

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()


@pytest.fixture
def mon_settings(kafka_settings: Settings, tmp_path: Path) -> Settings:
    s = stack_settings(kafka_settings)
    copier = s.copier.model_copy(update={"state_dir": tmp_path / "copier",
                                         "metrics_port": free_port()})
    return s.model_copy(update={"copier": copier})


def _flip_byte(path: Path, offset: int) -> None:
    """Change one byte of a replica behind the copier's back."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([old[0] ^ 0xFF]))


def _verify(settings: Settings, disk_key: str) -> tuple[int, list[dict[str, Any]]]:
    out = subprocess.run([sys.executable, "-m", "cbtctl.cli", "verify", "--json", "--disk",
                          disk_key], env=child_env(settings), capture_output=True, text=True,
                         timeout=60)
    return out.returncode, [json.loads(line) for line in out.stdout.splitlines()
                            if line.startswith("{")]


def declared_families(*texts: str) -> set[str]:
    return {m.group(1) for text in texts for m in re.finditer(r"^# TYPE (\S+) ", text, re.M)}


def is_declared(name: str, families: set[str]) -> bool:
    return name in families or any(
        name.endswith(s) and name.removesuffix(s) in families for s in _SUFFIXES)


async def missing(prom: Prometheus, http: aiohttp.ClientSession, exprs: list[Expr],
                  families: set[str], declared_only: list[str] | None = None) -> list[str]:
    """The module docstring's rule: what each expression names that does not exist, and the
    dashboard queries that return nothing although every metric they read has series.
    ``declared_only`` collects the selectors accepted because a process declares them."""
    problems = []
    for e in exprs:
        unseen = []
        for s in selectors(e.promql):
            if await prom.query(http, s.text):
                continue
            unseen.append(s)
            bare = await prom.query(http, s.name)
            if bare:
                labels = {name for r in bare for name in r["metric"]}
                if not s.label_names <= labels:
                    problems.append(f"{e.where}: {s.text}: {s.name} has no label "
                                    f"{sorted(s.label_names - labels)}")
            elif is_declared(s.name, families):
                if declared_only is not None:
                    declared_only.append(s.text)
            else:
                problems.append(f"{e.where}: {s.text} has no series and no process declares "
                                f"{s.name}")
        if (not unseen and not e.where.startswith("alert ")
                and not await prom.query(http, e.promql)):
            problems.append(f"{e.where}: no series, although every metric it reads has some: "
                            f"{e.promql}")
    return problems


async def test_prometheus_fires_on_a_flipped_replica_and_every_expression_exists(
        mon_settings: Settings, tmp_path: Path, record_property: Any) -> None:
    settings = mon_settings
    started = time.monotonic()
    worker = f"127.0.0.1:{settings.streams.web_port}"
    copier = f"127.0.0.1:{settings.copier.metrics_port}"
    prom = Prometheus(tmp_path, worker, copier)
    pipeline = Pipeline(settings, tmp_path / "logs")
    pipeline.start_copier()
    sim = SimulatorControl.from_state(settings.stack.dir.resolve() / "vcsim")
    scenario = Scenario(settings, sim, tmp_path / "models", seed=23, timeout_s=60)
    scenario.check_alive.append(pipeline.check)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            await prom.wait_ready(http)
            vm = await scenario.create_vm(random_name("mon"), [4 * MiB, 2 * MiB])
            a, b = (d.key for d in vm.disks)
            rng = scenario.rng
            c1 = await scenario.cycle(1, [w for d in vm.disks
                                          for w in initial_fill(rng, d.key, d.capacity)])
            assert all(r.verified for r in c1.rows), c1.rows

            # a byte flipped behind the copier: verify finds it and marks the replica
            _flip_byte(scenario.replica(b), 4096)
            rc, rows = await asyncio.to_thread(_verify, settings, f"{vm.instance_uuid}/disk-{b}")
            assert rc == 1 and [r["result"] for r in rows] == ["mismatch"], rows
            # and a record nobody can decode: the worker dead-letters it
            async with Publisher(settings.kafka) as pub:
                await pub.publish_raw(topic_name(SNAPSHOT_TAKEN, settings.kafka), b"k", b"{bad",
                                      [])
            c2 = await scenario.cycle(2, [w for d in vm.disks
                                          for w in scattered(rng, d.key, d.capacity)])
            by_disk = {r.disk_id: (r.replication_type, r.reason, r.verified) for r in c2.rows}
            assert by_disk == {f"disk-{a}": ("incremental", "previous_commit", True),
                               f"disk-{b}": ("full", "replica_mismatch", True)}, c2.rows
            repaired = time.monotonic()

            deadline = repaired + 30
            firing: set[str] = set()
            while not EXPECTED.issubset(firing):
                assert time.monotonic() < deadline, (
                    f"alerts firing: {firing}\n{json.dumps(await prom.alerts(http), indent=1)}")
                pipeline.check()
                await asyncio.sleep(0.5)
                firing = {x["labels"]["alertname"] for x in await prom.alerts(http)
                          if x["state"] == "firing"}
            fired_after = time.monotonic() - repaired
            mismatch = next(x for x in await prom.alerts(http)
                            if x["labels"]["alertname"] == "CbtstreamReplicaMismatch")
            assert mismatch["labels"]["instance"] == copier
            assert mismatch["labels"]["severity"] == "critical"
            assert firing == EXPECTED, firing

            texts = []
            for target in (worker, copier):
                async with http.get(f"http://{target}/metrics") as r:
                    texts.append(await r.text())
            families = declared_families(*texts)
            # rates over $__rate_interval need two samples of the series the repair created
            await asyncio.sleep(max(0.0, repaired + RATE_SAMPLES_S - time.monotonic()))
            declared_only: list[str] = []
            problems = await missing(prom, http, dashboard_expressions() + rule_expressions(),
                                     families, declared_only)
            assert not problems, "\n".join(problems)
            # not vacuous: a metric nobody serves, a label it does not have, a broken join
            assert len(await missing(prom, http, [
                Expr("panel probe", "cbtstream_no_such_total > 0"),
                Expr("panel probe", 'cbtstream_syncs_total{outcom="failed"}'),
                Expr("panel probe", "cbtstream_disks * on (disk_key) cbtstream_disk_info")],
                families)) == 3
    finally:
        await scenario.close()
        pipeline.stop()
        prom.stop()
    record_property("alert_fired_after_s", round(fired_after, 1))
    record_property("test_duration_s", round(time.monotonic() - started, 1))
    print(f"CbtstreamReplicaMismatch and CbtstreamDeadLetters firing {fired_after:.1f} s after "
          f"the repairing commit; test {time.monotonic() - started:.1f} s; selectors accepted "
          f"as declared without series: {sorted(set(declared_only))}")
