"""The image in use: the worker, the copier, the audit consumer and the snapshot scheduler as
containers of the image (podman, host network) against the local stack, replicating a VM of the
simulator twice (full, then incremental), each replica compared byte for byte with the snapshot.

The copier runs as in production: ``copier.exports = "vddk"`` from the image, one nbdkit per
disk and snapshot, with the project's stand-in for the vddk plugin mounted where the real
plugin goes (/opt/nbdkit-vddk) and nbdkit's Python plugin added to the image for it
(tests/deploy/Dockerfile.standin). State lives in named volumes (the worker's table store, the
copier's state and replicas), secrets in files mounted read-only (``*_file`` settings), never
in the environment.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cbtctl.demo.run import stack_settings
from cbtctl.demo.scenario import Scenario, files_equal, random_name
from cbtctl.demo.seed import SEED_QUERY_1, seed_queries
from cbtctl.demo.workload import MiB, initial_fill, scattered
from cbtstream.config import Settings
from cbtstream.vsphere.simctl import SimulatorControl
from schemas.events import ChangeIdCommitted, SnapshotTaken
from tests.deploy import podman
from tests.deploy.conftest import Images
from tests.support import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

STANDIN_DIR = podman.REPO / "devstack" / "nbdkit-vddk"
UID = 10001


class Deployment:
    """The containers of one test, their volumes and what they are given."""

    def __init__(self, images: Images, settings: Settings, audit_schema: str, tmp: Path) -> None:
        self.images = images
        self.id = f"cbtdep{uuid.uuid4().hex[:8]}"
        self.containers: dict[str, podman.Container] = {}
        self.volumes = {d: f"{self.id}-{d}" for d in ("faust", "copier", "replicas")}
        self.replicas = podman.volume(self.volumes["replicas"])
        for name in ("faust", "copier"):
            podman.volume(self.volumes[name])
        # Secrets as files the service user may read, mounted read-only.
        secrets = tmp / "secrets"
        secrets.mkdir(mode=0o755)
        for name, value in (("vcenter-password", settings.vsphere.password),
                            ("postgres-password", settings.postgres.password)):
            path = secrets / name
            path.write_text(value.get_secret_value())
            os.chown(path, UID, UID)
            path.chmod(0o400)
        assert settings.vsphere.cafile is not None
        self.web_port = free_port()
        self.metrics_port = free_port()
        self.env = {
            "CBTSTREAM_LOG_FORMAT": "json",
            "CBTSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "CBTSTREAM_KAFKA__TOPIC_PREFIX": settings.kafka.topic_prefix,
            "CBTSTREAM_KAFKA__PARTITIONS": str(settings.kafka.partitions),
            "CBTSTREAM_VSPHERE__URL": settings.vsphere.url,
            "CBTSTREAM_VSPHERE__USERNAME": settings.vsphere.username,
            "CBTSTREAM_VSPHERE__PASSWORD_FILE": "/run/secrets/vcenter-password",
            "CBTSTREAM_VSPHERE__CAFILE": "/run/cbtstream/vcenter-ca.pem",
            "CBTSTREAM_POSTGRES__HOST": settings.postgres.host,
            "CBTSTREAM_POSTGRES__PORT": str(settings.postgres.port),
            "CBTSTREAM_POSTGRES__USER": settings.postgres.user,
            "CBTSTREAM_POSTGRES__DATABASE": settings.postgres.database,
            "CBTSTREAM_POSTGRES__DB_SCHEMA": audit_schema,
            "CBTSTREAM_POSTGRES__PASSWORD_FILE": "/run/secrets/postgres-password",
            "CBTSTREAM_STREAMS__WEB_PORT": str(self.web_port),
            "CBTSTREAM_COPIER__METRICS_PORT": str(self.metrics_port),
            "CBTSTREAM_COPIER__PROGRESS_INTERVAL_S": "0.5",
        }
        self.mounts = [f"{secrets}:/run/secrets:ro",
                       f"{settings.vsphere.cafile}:/run/cbtstream/vcenter-ca.pem:ro"]

    def start(self, role: str, args: list[str], *, image: str | None = None,
              env: dict[str, str] | None = None, mounts: list[str] | None = None,
              options: list[str] | None = None) -> podman.Container:
        c = podman.Container(f"{self.id}-{role}", image or self.images.image, args,
                             env={**self.env, **(env or {})},
                             mounts=[*self.mounts, *(mounts or [])], options=options or [])
        self.containers[role] = c
        return c

    def check(self) -> None:
        for role, c in self.containers.items():
            if not c.running:
                raise RuntimeError(f"container {role} exited:\n{c.logs()[-4000:]}")

    def wait_worker_ready(self, timeout_s: float = 120) -> None:
        url = f"http://127.0.0.1:{self.web_port}/api/v1/ready"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check()
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"the worker container was not ready after {timeout_s}s")

    def remove(self) -> None:
        for c in self.containers.values():
            c.remove()
        for name in self.volumes.values():
            podman.podman("volume", "rm", "-f", name, check=False)


@pytest.fixture
def deployment(images: Images, kafka_settings: Settings, audit_schema: str, tmp_path: Path
               ) -> Iterator[Deployment]:
    d = Deployment(images, stack_settings(kafka_settings), audit_schema, tmp_path)
    yield d
    d.remove()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return bytes(resp.read())


def _snapshots(output: str) -> list[SnapshotTaken]:
    return [SnapshotTaken.model_validate_json(line) for line in output.splitlines()
            if line.startswith("{") and '"event_type":"SnapshotTaken"' in line]


async def test_replication_by_containers_of_the_image(
    deployment: Deployment, kafka_settings: Settings, audit_schema: str, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    d = deployment
    d.start("worker", ["worker"], mounts=[f"{d.volumes['faust']}:/var/lib/cbtstream/faust"])
    # The stand-in reads the simulator's frozen snapshot images from this host's disk where the
    # real plugin reads ESXi over the network: the folder is mounted read-only at its own path
    # and, its files being root's (0600), the copier gets CAP_DAC_READ_SEARCH for it (and no
    # other capability; its own volumes it writes as the image's user).
    frozen = kafka_settings.stack.dir.resolve() / "vcsim" / "frozen"
    copier = d.start(
        "copier", ["copier"], image=d.images.standin,
        env={"CBTSTREAM_COPIER__VDDK__PLUGIN": "/opt/nbdkit-vddk/vddk_standin.py"},
        mounts=[f"{d.volumes['copier']}:/var/lib/cbtstream/copier",
                f"{d.volumes['replicas']}:/var/lib/cbtstream/replicas",
                f"{STANDIN_DIR}:/opt/nbdkit-vddk:ro", f"{frozen}:{frozen}:ro"],
        options=["--cap-add", "DAC_READ_SEARCH"])
    d.start("audit", ["audit"])
    await asyncio.to_thread(d.wait_worker_ready)
    started_s = time.monotonic() - t0

    # The test drives the simulator and reads the replicas where the volume keeps them.
    host = stack_settings(kafka_settings)
    host = host.model_copy(update={
        "copier": host.copier.model_copy(update={"target_root": d.replicas}),
        "postgres": host.postgres.model_copy(update={"db_schema": audit_schema})})
    sim = SimulatorControl.from_state(host.stack.dir.resolve() / "vcsim")
    scenario = Scenario(host, sim, tmp_path / "models", seed=23, timeout_s=180)
    scenario.check_alive.append(d.check)
    scheduler: podman.Container | None = None
    try:
        vm = await scenario.create_vm(random_name("deploy"), [24 * MiB, 8 * MiB])
        keys = [disk.key for disk in vm.disks]
        for cycle in (1, 2):
            writes = [w for disk in vm.disks for w in (
                initial_fill(scenario.rng, disk.key, disk.capacity) if cycle == 1
                else scattered(scenario.rng, disk.key, disk.capacity))]
            await scenario.write(writes)
            if cycle == 1:  # a one-shot `cbtstream snapshot VM`
                shot = await asyncio.to_thread(
                    podman.podman, "run", "--rm", *podman.RUN_OPTS,
                    *[a for k, v in d.env.items() for a in ("-e", f"{k}={v}")],
                    *[a for m in d.mounts for a in ("-v", m)],
                    d.images.image, "snapshot", vm.instance_uuid, timeout=120)
                events = _snapshots(shot.stdout)
            else:  # the scheduler: `cbtstream snapshot --every 1h VM` snapshots at once
                scheduler = d.start("scheduler", ["snapshot", "--every", "1h", vm.instance_uuid])
                deadline = time.monotonic() + 60
                while not (events := _snapshots(scheduler.logs())):
                    assert time.monotonic() < deadline, scheduler.logs()
                    await asyncio.sleep(0.5)
            assert {e.disk.device_key for e in events} == set(keys)
            snap = events[0].vm_snapshot
            await scenario.wait(snap, keys)
            assert scenario.watcher is not None
            outcomes = scenario.watcher.outcomes(snap)
            for key in keys:
                out = outcomes[key]
                assert isinstance(out, ChangeIdCommitted), out
                assert out.replication_type == ("full" if cycle == 1 else "incremental")
                replica = scenario.replica(key)
                assert files_equal(replica, scenario.model(key)), f"cycle {cycle} disk {key}"
                assert replica.stat().st_uid == UID
                print(f"cycle {cycle} disk-{key}: {out.replication_type} ({out.reason}), "
                      f"{out.bytes_copied} bytes copied, replica == snapshot, byte for byte")
        rows, _ = await seed_queries(host, vm.path, vm.name, commits=2 * len(keys))
        assert len(rows) >= 2 * len(keys), SEED_QUERY_1
        metrics = await asyncio.to_thread(_get, f"http://127.0.0.1:{d.metrics_port}/metrics")
        assert b"cbtstream_syncs_total" in metrics
    finally:
        await scenario.close()
    replicated_s = time.monotonic() - t0

    copier_log = copier.logs()
    assert '"msg":"starting nbdkit"' in copier_log  # the VDDK export path, in the container
    # SIGTERM through tini (PID 1): the services stop cleanly (exit 0); `snapshot --every` has
    # no handler and ends by the signal itself (143), at once, never SIGKILLed after the grace
    # time (137), which is what a cbtstream process as PID 1 would get.
    codes = {role: c.stop() for role, c in d.containers.items()}
    print(f"containers up and worker ready in {started_s:.1f}s; two cycles replicated, audited "
          f"and checked in {replicated_s:.1f}s; exit codes after SIGTERM: {codes}")
    for role, c in d.containers.items():
        lines = [line for line in c.logs().splitlines() if '"level":"error"' in line]
        assert not lines, f"{role}: {lines[:5]}"
    assert codes == {"worker": 0, "copier": 0, "audit": 0, "scheduler": 143}, codes
